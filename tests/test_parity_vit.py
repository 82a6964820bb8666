"""ViT against transformers on the same weights; images through the checkpoint's AutoImageProcessor."""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from energon_hf import EnergonModel, images

VIT_TINY = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=96, num_labels=5)


@pytest.fixture(scope="module")
def vit_folders(tmp_path_factory):
    folders = {}
    for arch in ("ViTModel", "ViTForImageClassification"):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(arch)
        getattr(transformers, arch)(transformers.ViTConfig(**VIT_TINY)).eval().save_pretrained(path)
        transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
        folders[arch] = path
    return folders


def _pictures() -> list[Image.Image]:
    """Different sizes and modes: the processor resizes, load_image converts to RGB."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (50, 40, 3), dtype=np.uint8))
    gray = Image.fromarray(rng.integers(0, 255, (20, 64), dtype=np.uint8))  # mode L
    rgba = Image.fromarray(rng.integers(0, 255, (32, 32, 4), dtype=np.uint8))  # mode RGBA
    return [rgb, gray, rgba]


@pytest.mark.parametrize("arch", ["ViTModel", "ViTForImageClassification"])
def test_matches_transformers(vit_folders, arch):
    folder = vit_folders[arch]
    ours = EnergonModel.from_pretrained(folder)
    hf = getattr(transformers, arch).from_pretrained(folder).eval()
    pixel_values = images.preprocess(images.load_processor(folder), _pictures())
    assert pixel_values.shape == (3, 3, 32, 32)
    with torch.no_grad():
        expected = hf(pixel_values=pixel_values)
    got = ours(pixel_values=pixel_values)
    assert type(got) is type(expected)
    for field in ("last_hidden_state", "pooler_output", "logits"):
        if field in expected:
            assert getattr(got, field).shape == getattr(expected, field).shape
            assert (getattr(got, field) - getattr(expected, field)).abs().max() <= 1e-4, field


def test_image_paths_and_arrays(vit_folders, tmp_path):
    processor = images.load_processor(vit_folders["ViTModel"])
    picture = _pictures()[0]
    picture.save(tmp_path / "a.png")
    from_path = images.preprocess(processor, str(tmp_path / "a.png"))
    from_array = images.preprocess(processor, np.asarray(picture))
    assert torch.equal(from_path, from_array) and from_path.shape == (1, 3, 32, 32)


def test_bad_images_and_pixel_values(vit_folders, tmp_path):
    ours = EnergonModel.from_pretrained(vit_folders["ViTModel"])
    processor = images.load_processor(vit_folders["ViTModel"])
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="notes.txt' is not an image"):
        images.preprocess(processor, [tmp_path / "notes.txt"])
    with pytest.raises(ValueError, match="does not exist"):
        images.preprocess(processor, "missing.png")
    with pytest.raises(ValueError, match="expected a PIL image"):
        images.preprocess(processor, [42])
    with pytest.raises(ValueError, match=r"expected \[batch, 3, 32, 32\]"):
        ours(pixel_values=torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        ours(pixel_values=None)
    with pytest.raises(ValueError, match="interpolate_pos_encoding is not supported"):
        ours(pixel_values=torch.zeros(1, 3, 32, 32), interpolate_pos_encoding=True)
