"""Small archives in the shared data files' layouts, for loader tests."""
import io
import tarfile

import numpy as np


def make_dogfish_tar(path, n_per=(6, 5), gray_every=4):
    """A small archive in the shared file's layout (train/ and val/ folders per synset)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for syn, n in zip(("n02102040", "n01440764"), n_per):
            for j in range(n):
                split = "train" if j % 3 else "val"
                arr = rng.integers(0, 256, (20, 24, 3)).astype(np.uint8)
                im = Image.fromarray(arr[..., 0], "L") if j % gray_every == 0 else Image.fromarray(arr, "RGB")
                buf = io.BytesIO()
                im.save(buf, format="JPEG")
                info = tarfile.TarInfo(f"imagenette_tench_springer/{split}/{syn}/img_{j:03d}.JPEG")
                info.size = len(buf.getvalue())
                tar.addfile(info, io.BytesIO(buf.getvalue()))
