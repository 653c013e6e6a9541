"""Reading datasets for fits to real data (cameras.json, transforms.json, COLMAP text, masks) and
writing images. One reader per format; :func:`load_dataset` picks the format and reads images and masks."""

from diffrender.io.cameras_json import load_cameras_json, read_cameras_json
from diffrender.io.colmap import read_colmap
from diffrender.io.dataset import ImageSet, load_dataset, load_image_set, mask_paths, read_views
from diffrender.io.images import read_image, read_mask, to_uint8, write_png
from diffrender.io.transforms_json import read_transforms_json
from diffrender.io.views import Views

__all__ = [
    "ImageSet", "Views", "load_cameras_json", "load_dataset", "load_image_set", "mask_paths", "read_cameras_json",
    "read_colmap", "read_image", "read_mask", "read_transforms_json", "read_views", "to_uint8", "write_png",
]
