"""A copy of an image folder with the shorter side of every image resized to --size pixels, for faster decoding.

Wong et al.'s ImageNet configuration reads its first phase (crop 128) from a 160-pixel copy and its second (crop 224)
from a 352-pixel one (their ImageNet/resize.py: PIL, bicubic, the shorter side): a small JPEG decodes several times
faster than a full-size one, and decoding, not the GPU, bounds a phase with small crops. Made with torchvision:

    python bench/resize_folder.py DATA_DIR DATA_DIR-160 --size 160
    python bench/resize_folder.py DATA_DIR DATA_DIR-352 --size 352
    python fgsm_rs.py --dataset imagenet --data-dir DATA_DIR --phase-data-dirs DATA_DIR-160 DATA_DIR-352 DATA_DIR

Every image file under DATA_DIR (its train/ and val/ or test/ class folders, as torchvision's ImageFolder lists them)
is read, resized by torchvision's Resize (bicubic) and written under the same name in the copy (PIL's default save
settings, as theirs), in --workers DataLoader processes. An existing copy is filled in: files already there are kept.
"""

import argparse
import os

import torch
from torchvision import transforms
from torchvision.datasets import ImageFolder


class Resized(torch.utils.data.Dataset):
    def __init__(self, folder, src, dst, size):
        self.folder, self.src, self.dst = folder, src, dst
        self.resize = transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC)

    def __len__(self):
        return len(self.folder.samples)

    def __getitem__(self, i):
        path = self.folder.samples[i][0]
        out = os.path.join(self.dst, os.path.relpath(path, self.src))
        if not os.path.exists(out):
            from PIL import Image

            os.makedirs(os.path.dirname(out), exist_ok=True)
            image = self.resize(self.folder.loader(path))
            image.save(
                out + ".part",
                format=Image.registered_extensions()[os.path.splitext(out)[1].lower()],
            )
            os.replace(
                out + ".part", out
            )  # a copy interrupted mid-file leaves no half-written image
        return 1


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("src", help="an image folder: SRC/train/CLASS/*, SRC/val/CLASS/* (or test/)")
    p.add_argument("dst", help="where the copy goes")
    p.add_argument("--size", type=int, required=True, help="pixels of the shorter side")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    splits = [d for d in ("train", "val", "test") if os.path.isdir(os.path.join(args.src, d))]
    if "train" not in splits:
        p.error(f"{args.src}/train: no such folder")
    for split in splits:
        folder = ImageFolder(os.path.join(args.src, split))
        loader = torch.utils.data.DataLoader(
            Resized(folder, args.src, args.dst, args.size),
            batch_size=256,
            num_workers=args.workers,
            collate_fn=len,
        )
        done = 0
        for n in loader:
            done += n
        print(
            f"{split}: {done} images resized to {args.size} px (shorter side) in "
            f"{args.dst}/{split}",
            flush=True,
        )


if __name__ == "__main__":
    main()
