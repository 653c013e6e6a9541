"""Dataset formats round-trip: a scene written here (tests/dataset_writers.py, from the formats' specs) reads
back to the same cameras (R, t, K within 1e-6) and the same renders; distortion is refused; masks load in
every accepted mode; bad fields are named in one line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from dataset_writers import (
    c2w_opengl,
    write_cameras_json,
    write_colmap,
    write_image,
    write_transforms_json,
)
from reference_zbuffer import look_at, rodrigues

from diffrender import render as R
from diffrender.camera import Camera, opencv_to_opengl, opengl_to_opencv
from diffrender.errors import UserError
from diffrender.io import load_dataset, read_image, read_mask, read_views
from diffrender.mesh import icosphere

D = torch.float64
H, W = 12, 16  # non-square on purpose


def scene(n: int = 3, seed: int = 0):
    """n cameras around the origin with distinct intrinsics, and an image per view (RGBA, random)."""
    rng = np.random.default_rng(seed)
    Rs, ts, K = [], [], []
    for i in range(n):
        eye = rng.normal(size=3)
        eye = 3.0 * eye / np.linalg.norm(eye)
        Rl, _ = look_at(eye)
        Rr = rodrigues([0.0, 0.0, 0.3 * i]) @ Rl  # some roll, so that R is not a pure look-at
        Rs.append(Rr)
        ts.append(-Rr @ eye + rng.normal(scale=0.05, size=3))
        K.append([20.0 + i, 21.5 + 2 * i, W / 2 + 0.25 * i, H / 2 - 0.5 * i])
    imgs = rng.uniform(size=(n, H, W, 4))
    return np.stack(Rs), np.stack(ts), np.asarray(K), imgs


def camera_of(Rs, ts, K) -> Camera:
    K = torch.tensor(K, dtype=D)
    return Camera(torch.tensor(Rs, dtype=D), torch.tensor(ts, dtype=D), K[:, :2].contiguous(), K[:, 2:].contiguous(),
                  H, W)


def assert_same_cameras(cam: Camera, Rs, ts, K) -> None:
    ref = camera_of(Rs, ts, K)
    for name in ("R", "t", "focal", "principal"):
        torch.testing.assert_close(getattr(cam, name), getattr(ref, name), atol=1e-6, rtol=0, msg=name)
    assert (cam.height, cam.width) == (H, W)
    sph = icosphere(1, dtype=D)
    settings = R.RenderSettings(sigma=1e-4, cull_backfaces=False)
    a = R.render_mesh(sph, cam, settings, outputs=("alpha",))["alpha"]
    b = R.render_mesh(sph, ref, settings, outputs=("alpha",))["alpha"]
    assert float(a.sum()) > 10  # the sphere is in view
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def write_images(folder, names, imgs):
    for n, img in zip(names, imgs, strict=True):
        (folder / n).parent.mkdir(parents=True, exist_ok=True)
        write_image(folder / n, img)


def assert_same_images(data, imgs):
    assert np.abs(data.rgb.numpy() - imgs[..., :3]).max() <= 0.5 / 255 + 1e-6
    assert np.abs(data.alpha.numpy() - imgs[..., 3]).max() <= 0.5 / 255 + 1e-6


@pytest.mark.parametrize("fov", [False, True])
def test_cameras_json_round_trip(tmp_path, fov):
    Rs, ts, K, imgs = scene()
    if fov:  # the fov form means square pixels and a centered principal point
        K[:, 1], K[:, 2], K[:, 3] = K[:, 0], W / 2, H / 2
    names = [f"v{i}.png" for i in range(3)]
    write_images(tmp_path, names, imgs)
    write_cameras_json(tmp_path, Rs, ts, K, H, W, names, use_fov=fov)
    data = load_dataset(tmp_path, dtype=D)
    assert data.format == "cameras.json" and data.mask is not None
    assert_same_cameras(data.camera, Rs, ts, K)
    assert_same_images(data, imgs)


def test_cameras_json_fov_fields_and_defaults(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    base = {"width": W, "height": H, "eye": [0, 0, 3]}
    cams = {"fov_y_deg": 60, "views": [{"file": "a.png", **base}, {"file": "a.png", **base, "fov_x_deg": 60}]}
    (tmp_path / "cameras.json").write_text(json.dumps(cams))
    v = read_views(tmp_path, dtype=D)
    fy = 0.5 * H / math.tan(math.radians(30))
    fx = 0.5 * W / math.tan(math.radians(30))
    # view 0: the top-level fov_y_deg, square pixels; view 1 overrides with fov_x_deg (the default fov_y also
    # applies, so both focal lengths come from their own angle)
    torch.testing.assert_close(v.camera.focal[0], torch.tensor([fy, fy], dtype=D))
    torch.testing.assert_close(v.camera.focal[1], torch.tensor([fx, fy], dtype=D))
    torch.testing.assert_close(v.camera.principal[0], torch.tensor([W / 2, H / 2], dtype=D))


@pytest.mark.parametrize("angle", [False, True])
def test_transforms_json_round_trip(tmp_path, angle):
    Rs, ts, K, imgs = scene()
    K[:] = K[0]  # one shared intrinsics block (top level)
    if angle:  # NeRF-synthetic: camera_angle_x only, square pixels, centered
        K[:, 1], K[:, 2], K[:, 3] = K[:, 0], W / 2, H / 2
    names = [f"train/r_{i}.png" for i in range(3)]
    write_images(tmp_path, names, imgs)
    write_transforms_json(tmp_path, Rs, ts, K, H, W, names, angle=angle)
    data = load_dataset(tmp_path, dtype=D)
    assert data.format == "transforms.json"
    assert [f.name for f in data.files] == [f"r_{i}.png" for i in range(3)]  # extension found when absent
    assert_same_cameras(data.camera, Rs, ts, K)
    assert_same_images(data, imgs)


def test_opengl_conversion_matches_the_written_matrices():
    Rs, ts, _, _ = scene()
    c2w = torch.tensor(np.stack([c2w_opengl(r, t) for r, t in zip(Rs, ts, strict=True)]), dtype=D)
    torch.testing.assert_close(opencv_to_opengl(torch.tensor(Rs, dtype=D), torch.tensor(ts, dtype=D)), c2w)
    Rb, tb = opengl_to_opencv(c2w)
    torch.testing.assert_close(Rb, torch.tensor(Rs, dtype=D))
    torch.testing.assert_close(tb, torch.tensor(ts, dtype=D))
    # OpenGL cameras look down their -z axis: the object at the origin is in front of each camera
    assert bool((c2w[:, :3, 2] * c2w[:, :3, 3]).sum(-1).gt(0).all())


@pytest.mark.parametrize("model", ["PINHOLE", "SIMPLE_PINHOLE", "SIMPLE_RADIAL", "OPENCV"])
def test_colmap_round_trip(tmp_path, model):
    Rs, ts, K, imgs = scene(4)
    if model in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL"):
        K[:, 1] = K[:, 0]
    names = [f"img_{i}.png" for i in range(4)]
    write_colmap(tmp_path, Rs, ts, K, H, W, names, model=model)
    write_images(tmp_path / "images", names, imgs)
    data = load_dataset(tmp_path, dtype=D)  # finds sparse/0 and images/
    assert data.format == "colmap" and [f.name for f in data.files] == names
    assert_same_cameras(data.camera, Rs, ts, K)
    assert_same_images(data, imgs)
    v = read_views(tmp_path / "sparse" / "0", dtype=D)  # the model folder itself works too
    torch.testing.assert_close(v.camera.R, data.camera.R)


@pytest.mark.parametrize("case", ["colmap_opencv", "colmap_radial", "transforms_k1", "transforms_fisheye",
                                  "colmap_fisheye"])
def test_distortion_is_refused_in_one_line(tmp_path, case):
    Rs, ts, K, imgs = scene(1)
    if case.startswith("colmap"):
        model = {"colmap_opencv": "OPENCV", "colmap_radial": "SIMPLE_RADIAL", "colmap_fisheye": "PINHOLE"}[case]
        dist = {"colmap_opencv": (0.0, 0.0, 0.01, 0.0), "colmap_radial": (-0.02,)}.get(case, ())
        d = write_colmap(tmp_path, Rs, ts, K, H, W, ["a.png"], model=model, distortion=dist)
        write_images(tmp_path / "images", ["a.png"], imgs)
        if case == "colmap_fisheye":
            text = (d / "cameras.txt").read_text().replace("PINHOLE", "OPENCV_FISHEYE")
            (d / "cameras.txt").write_text(text.replace(" 21.5 ", " 21.5 0 0 0 0 ", 1))
    else:
        write_images(tmp_path, ["a.png"], imgs)
        extra = {"k1": 0.1, "k2": 0.0} if case == "transforms_k1" else {"camera_model": "OPENCV_FISHEYE"}
        write_transforms_json(tmp_path, Rs, ts, K, H, W, ["a.png"], extra=extra)
    with pytest.raises(UserError) as e:
        load_dataset(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    if case == "transforms_k1" or case.startswith("colmap_") and case != "colmap_fisheye":
        assert "distortion" in msg and "undistort" in msg
    else:
        assert "FISHEYE" in msg and "undistort" in msg


@pytest.mark.parametrize("mode", ["L", "L16", "LA", "RGB", "RGBA"])
def test_masks_load_in_each_mode(tmp_path, mode):
    rng = np.random.default_rng(1)
    m = rng.uniform(size=(H, W))
    img = {"L": m, "L16": m, "LA": np.stack([rng.uniform(size=(H, W)), m], -1), "RGB": np.stack([m] * 3, -1),
           "RGBA": np.concatenate([rng.uniform(size=(H, W, 3)), m[..., None]], -1)}[mode]
    write_image(tmp_path / "m.png", img, bits=16 if mode == "L16" else 8)
    tol = 0.5 / 65535 if mode == "L16" else 0.5 / 255
    assert np.abs(read_mask(tmp_path / "m.png") - m).max() <= tol + 1e-6


@pytest.mark.parametrize("how", ["pattern_stem", "pattern_name", "cameras_json", "mask_path"])
def test_masks_beside_rgb_images(tmp_path, how):
    Rs, ts, K, imgs = scene(2)
    imgs = imgs[..., :3]  # RGB images without alpha: the masks are the silhouettes
    names = ["a.png", "b.png"]
    masks = np.random.default_rng(2).uniform(size=(2, H, W)) > 0.5
    mnames = {"pattern_stem": ["masks/a.png", "masks/b.png"],
              "pattern_name": ["masks/a.png.png", "masks/b.png.png"]}.get(how, ["ma.png", "mb.png"])
    write_images(tmp_path, names, imgs)
    write_images(tmp_path, mnames, masks.astype(float))
    if how == "mask_path":
        write_transforms_json(tmp_path, Rs, ts, K, H, W, names, masks=mnames)
    else:
        write_cameras_json(tmp_path, Rs, ts, K, H, W, names, masks=mnames if how == "cameras_json" else None)
    pattern = {"pattern_stem": "masks/{stem}.png", "pattern_name": "masks/{name}.png"}.get(how)
    data = load_dataset(tmp_path, masks=pattern, dtype=D)
    assert data.alpha is None and data.mask is not None
    np.testing.assert_array_equal(data.mask.numpy() > 0.5, masks)
    assert np.abs(data.rgb.numpy() - imgs).max() <= 0.5 / 255 + 1e-6


def test_format_detection_and_errors_name_the_field(tmp_path):
    with pytest.raises(UserError, match="no camera file"):
        load_dataset(tmp_path)
    Rs, ts, K, imgs = scene(1)
    write_images(tmp_path, ["a.png"], imgs)
    p = write_cameras_json(tmp_path, Rs, ts, K, H, W, ["a.png"])
    data = json.loads(p.read_text())

    def fails(view_update: dict, match: str):
        d = json.loads(json.dumps(data))
        d["views"][0].update(view_update)
        p.write_text(json.dumps(d))
        with pytest.raises(UserError, match=match):
            read_views(tmp_path)

    fails({"fov_y_deg": 40}, "not both")  # fx and a field of view
    fails({"fx": "wide"}, r"views\[0\]: field 'fx'")
    d = {k: v for k, v in data["views"][0].items() if k not in ("fx", "fy")}
    p.write_text(json.dumps({"views": [{**d, "fov_y_deg": 200}]}))
    with pytest.raises(UserError, match="fov_y_deg"):
        read_views(tmp_path)
    p.unlink()
    t = write_transforms_json(tmp_path, Rs, ts, K, H, W, ["a.png"])
    bad = json.loads(t.read_text())
    bad["frames"][0]["transform_matrix"] = [[1, 0], [0, 1]]
    t.write_text(json.dumps(bad))
    with pytest.raises(UserError, match=r"frames\[0\]: 'transform_matrix'"):
        read_views(tmp_path)
    t.unlink()
    d = write_colmap(tmp_path, Rs, ts, K, H, W, ["a.png"])
    (d / "images.txt").write_text((d / "images.txt").read_text().replace(" 1 a.png", " 7 a.png"))
    with pytest.raises(UserError, match="camera id 7"):
        read_views(tmp_path)
    (tmp_path / "images").rmdir()
    with pytest.raises(UserError, match="no image folder"):
        read_views(tmp_path / "sparse" / "0")


def test_read_image_still_reads_what_write_png_wrote(tmp_path):
    from diffrender.io import write_png

    img = np.random.default_rng(3).uniform(size=(H, W, 4)).astype(np.float32)
    write_png(tmp_path / "x.png", img)
    assert np.abs(read_image(tmp_path / "x.png") - img).max() <= 0.5 / 255 + 1e-6
