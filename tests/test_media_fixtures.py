"""The test media helpers write what they promise: sizes, colours, frame counts and rates, with
per-frame colours that survive the codec well enough to tell which frame was sampled."""

from __future__ import annotations

import pytest

from media_fixtures import frame_color, frame_index, make_frames, make_image, make_video


def test_frame_colors_are_distinct_and_invertible():
    assert len({frame_color(i) for i in range(256)}) == 256
    assert all(frame_index(frame_color(i)) == i for i in range(256))
    r, g, b = frame_color(37)
    assert frame_index((r + 7, g - 7, b)) == 37  # codec error within the margin


def test_make_image_and_frames(tmp_path):
    from PIL import Image

    path = make_image(tmp_path / "sub" / "x.jpg", 90, 30, (10, 200, 30))
    with Image.open(path) as im:
        assert (im.format, im.size, im.mode) == ("JPEG", (90, 30), "RGB")
        assert all(abs(a - b) <= 20 for a, b in zip(im.getpixel((33, 11)), (10, 200, 30)))  # the block, JPEG-blurred
    frames = make_frames(tmp_path / "frames", 5, 32, 16)
    assert [p.name for p in frames] == [f"frame_{i:03d}.png" for i in range(5)]
    with Image.open(frames[3]) as im:
        assert im.size == (32, 16) and im.getpixel((0, 0)) == frame_color(3)


@pytest.mark.parametrize("fps", [8, 29.97])
def test_make_video_writes_the_frames_at_the_rate_and_size(tmp_path, fps):
    import av

    path = make_video(tmp_path / "clip.mp4", seconds=2, fps=fps, width=64, height=48)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height) == ("h264", 64, 48)
        assert abs(float(stream.average_rate) - fps) < 0.01
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(frames) == round(2 * fps)
    assert [frame_index(f[24, 32]) for f in frames] == list(range(len(frames)))


def test_other_codecs_and_containers(tmp_path):
    import av

    path = make_video(tmp_path / "clip.avi", seconds=1, fps=4, width=32, height=32, codec="mpeg4")
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 4 and frames[0].width == 32


def test_qwen_vl_utils_sampling_is_visible_in_the_frame_colors(tmp_path):
    from qwen_vl_utils import process_vision_info

    clip = make_video(tmp_path / "clip.mp4", seconds=2, fps=8, width=64, height=48)  # 16 frames
    _, videos = process_vision_info([{"role": "user", "content": [{"type": "video", "video": str(clip)}]}])
    video = videos[0]  # (T, C, H, W) float, resized; qwen-vl-utils samples 2 fps -> 4 frames
    centre = video[:, :, video.shape[2] // 2, video.shape[3] // 2]
    assert [frame_index(c.tolist()) for c in centre] == [0, 5, 10, 15]
