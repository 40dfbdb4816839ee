"""Videos in: qvl's PyAV reader picks the same frames as qwen-vl-utils' decord reader, and
prepare_vision returns what process_vision_info returns (clips written with PyAV)."""

from __future__ import annotations

import fractions
import os

import pytest
from media_fixtures import frame_color, make_image, make_video

from qwenvl_cli.media import video
from qwenvl_cli.errors import MediaError
from qwenvl_cli.media.sources import resolve_video
from qwenvl_cli.engine import vision as engine_vision
from qwenvl_cli.engine.vision import prepare_vision
from qwenvl_cli.media.vision import REFERENCE_DEFAULTS, VisionDefaults

np = pytest.importorskip("numpy")
torch = pytest.importorskip("torch")
av = pytest.importorskip("av")
pytest.importorskip("decord")
vp = pytest.importorskip("qwen_vl_utils.vision_process")


def _vfr_mkv(path, stamps):
    """A variable-frame-rate Matroska clip: frame i shown at stamps[i] ms, colour i."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = fractions.Fraction(1, 1000)
        for index, stamp in enumerate(stamps):
            pixels = np.empty((48, 64, 3), np.uint8)
            pixels[:] = frame_color(index)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = stamp, fractions.Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="session")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    clips = {
        "mp4": make_video(root / "clip.mp4", 4, 30, 64, 48),
        "gop": make_video(root / "gop.mp4", 10, 30, 64, 48, gop=60,
                          options={"x264-params": "scenecut=0:bframes=3"}),
        "mkv": make_video(root / "clip.mkv", 3, 25, 64, 48),
        "webm": make_video(root / "clip.webm", 2, 24, 64, 48),
        "mov": make_video(root / "clip.mov", 3, 29.97, 64, 48),
        "avi": make_video(root / "clip.avi", 3, 30, 64, 48),
        "vfr": _vfr_mkv(root / "vfr.mkv", [i * 40 for i in range(25)] + [1000 + i * 80 for i in range(25)]),
    }
    frames = root / "frames"
    frames.mkdir()
    for index in range(11):
        make_image(frames / f"frame_{index}.jpg", 100, 80, colour=frame_color(index), fmt="JPEG")
    clips["frames"] = frames
    return clips


def _decord(path, opts):
    frames, meta, sample_fps = vp._read_video_decord({"video": str(path), **opts})
    return frames, list(meta["frames_indices"]), sample_fps


@pytest.mark.parametrize("clip,opts", [
    ("mp4", {}),
    ("mp4", {"fps": 5.0}),
    ("mp4", {"nframes": 8}),
    ("mp4", {"nframes": 7}),
    ("mp4", {"fps": 10.0, "max_frames": 6}),
    ("mp4", {"video_start": 0.5, "video_end": 2.0}),
    ("mp4", {"video_start": 1.3, "fps": 4.0}),
    ("mp4", {"fps": 0.5, "min_frames": 8}),
    ("gop", {"nframes": 16}),
    ("gop", {"fps": 3.0, "video_start": 1.9, "video_end": 8.1}),
    ("mkv", {}),
    ("mkv", {"nframes": 10}),
    ("webm", {"fps": 6.0}),
    ("mov", {"nframes": 12}),
    ("avi", {"fps": 4.0}),
    ("vfr", {"nframes": 20}),
])
def test_sampled_frames_equal_decord_reader(clips, clip, opts):
    frames, indices, count, fps, sample_fps = engine_vision.sample_video(clips[clip], opts)
    expected, expected_indices, expected_fps = _decord(clips[clip], opts)
    assert indices == expected_indices
    assert sample_fps == expected_fps
    assert frames.dtype == torch.uint8 and frames.shape == expected.shape
    assert torch.equal(frames, expected)  # 8-bit sources: identical RGB (docs/media.md)


def test_seeking_across_key_frames_with_b_frames(clips):
    """Every frame, and frames around key frames, read back exactly as decord reads them."""
    import decord

    path = clips["gop"]
    reader = decord.VideoReader(str(path))
    with video.VideoFile(path) as clip:
        assert clip.timeline.exact is None  # the mp4 index gave a constant-rate timeline
        for indices in ([58, 59, 60, 61, 119, 120, 121, 299], [0, 299], [5, 5, 4], list(range(300))):
            got = clip.read(indices)
            assert np.array_equal(got, reader.get_batch(indices).asnumpy()), indices


def test_a_wrong_fast_timeline_falls_back_to_the_packet_pass(clips, monkeypatch):
    real = video._fast_timeline

    def shifted(stream, total, fps):
        timeline = real(stream, total, fps)
        return video._Timeline(timeline.total, timeline.fps, timeline.keyframes,
                               start=timeline.start + 7, step=timeline.step)

    monkeypatch.setattr(video, "_fast_timeline", shifted)
    indices = [3, 40, 41, 77, 100]
    with video.VideoFile(clips["mp4"]) as clip:
        assert clip.timeline.exact is None
        frames = clip.read(indices)
        assert clip.timeline.exact is not None  # it noticed, and read the packets' timestamps
    import decord

    batch = decord.VideoReader(str(clips["mp4"])).get_batch(indices).asnumpy()
    assert np.array_equal(frames, batch)


def test_process_vision_info_equals_prepare_vision(clips, tmp_path):
    image = make_image(tmp_path / "still.png", 300, 200)
    frames = sorted(str(p) for p in clips["frames"].iterdir())[:5]
    content = [{"type": "image", "image": str(image)},
               {"type": "video", "video": str(clips["mp4"]), "fps": 3.0},
               {"type": "video", "video": frames, "max_pixels": 300 * 784},
               {"type": "text", "text": "What changes?"}]
    messages = [{"role": "user", "content": content}]
    images, videos, kwargs = vp.process_vision_info(messages, return_video_kwargs=True)
    got_images, got_videos, got_kwargs, infos = prepare_vision(messages, REFERENCE_DEFAULTS)
    assert got_kwargs == kwargs
    assert np.array_equal(np.asarray(got_images[0]), np.asarray(images[0]))
    for got, expected in zip(got_videos, videos):
        assert got.dtype == expected.dtype == torch.float32 and torch.equal(got, expected)
    assert [i.kind for i in infos] == ["image", "video", "video"]
    assert infos[1].frames == 12 and infos[1].indices == tuple(torch.linspace(0, 119, 12).round().long().tolist())
    assert infos[2].frames == 6  # 5 frames padded to an even count
    assert "12 frames of 120 at 30 fps" in infos[1].describe()
    assert infos[1].to_dict()["tokens"] == infos[1].tokens and "indices" not in infos[1].to_dict()


def test_qvl_defaults_equal_reference_with_the_same_values(clips):
    defaults = VisionDefaults.from_flags(max_pixels=200 * 784, fps=4.0, max_frames=10, video_start=0.5)
    item = {"type": "video", "video": str(clips["mp4"])}
    _, videos, kwargs, infos = prepare_vision([{"role": "user", "content": [item]}], defaults)
    explicit = {**item, "max_pixels": 200 * 784, "fps": 4.0, "max_frames": 10, "video_start": 0.5}
    _, expected, expected_kwargs = vp.process_vision_info([{"role": "user", "content": [explicit]}],
                                                          return_video_kwargs=True)
    assert kwargs == expected_kwargs and torch.equal(videos[0], expected[0])
    assert infos[0].frames == 10


def test_frame_directory_is_sorted_naturally_and_equals_the_list(clips):
    source = resolve_video(str(clips["frames"]))
    names = [os.path.basename(f.source) for f in source.frames]
    assert names == [f"frame_{i}.jpg" for i in range(11)]  # frame_2 before frame_10
    item = {"type": "video", "video": str(clips["frames"])}
    _, videos, kwargs, infos = prepare_vision([{"role": "user", "content": [item]}], REFERENCE_DEFAULTS)
    listed = {"type": "video", "video": [f.source for f in source.frames]}
    _, expected, expected_kwargs = vp.process_vision_info([{"role": "user", "content": [listed]}],
                                                          return_video_kwargs=True)
    assert torch.equal(videos[0], expected[0]) and kwargs == expected_kwargs
    assert videos[0].shape[0] == 12 and infos[0].frames == 12


def test_frames_of_different_sizes_are_refused(tmp_path):
    frames = [make_image(tmp_path / "a.png", 100, 80), make_image(tmp_path / "b.png", 300, 80)]
    item = {"type": "video", "video": [str(f) for f in frames]}
    with pytest.raises(MediaError, match="resize to different sizes"):
        prepare_vision([{"role": "user", "content": [item]}])


def _zero_frame(path):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height = 64, 48
        container.start_encoding()
    return path


def test_bad_videos_give_one_line_errors(clips, tmp_path):
    def error(ref):
        with pytest.raises(MediaError) as info:
            resolve_video(ref)
        assert info.value.hint and "\n" not in info.value.message
        return info.value.message

    assert "no frames" in error(str(_zero_frame(tmp_path / "zero.mp4")))
    assert "no frames" in error(str(_zero_frame(tmp_path / "zero.mkv")))
    (tmp_path / "noise.mp4").write_bytes(os.urandom(4000))
    assert "not a readable video" in error(str(tmp_path / "noise.mp4"))
    data = clips["mp4"].read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # index (moov) at the end: lost
    assert "not a readable video" in error(str(tmp_path / "cut.mp4"))
    (tmp_path / "notes.mp4").write_text("not a video")
    assert "not a readable video" in error(str(tmp_path / "notes.mp4"))
    (tmp_path / "empty.webm").write_bytes(b"")
    assert "empty (0 bytes)" in error(str(tmp_path / "empty.webm"))
    assert "is an image, not a video" in error(str(make_image(tmp_path / "still.png", 32, 32)))
    (tmp_path / "nothing").mkdir()
    assert "holds no frame images" in error(str(tmp_path / "nothing"))
    assert "no such file" in error(str(tmp_path / "gone.mp4"))
    assert "not 'https:' URLs" in error("https://example.com/clip.mp4")
    assert "empty list of frames" in error([])


def test_a_truncated_video_fails_when_its_missing_frames_are_read(tmp_path):
    path = tmp_path / "fast.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(90):
            pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = path.read_bytes()
    (tmp_path / "half.mp4").write_bytes(data[: len(data) // 2])
    source = resolve_video(str(tmp_path / "half.mp4"))  # the header and first frame are fine
    with pytest.raises(MediaError, match="truncated or corrupt"):
        engine_vision.sample_video(source.path, {"nframes": 8})


def test_range_and_count_errors_are_media_errors(clips):
    for opts, text in (({"video_start": 3.0, "video_end": 1.0}, "selects no frames"),
                       ({"nframes": 500}, "cannot sample 500 frames"),
                       ({"fps": 2.0, "nframes": 4}, "both fps and nframes")):
        with pytest.raises(MediaError, match=text):
            engine_vision.sample_video(clips["mp4"], opts)


def test_plans_from_metadata_equal_what_prepare_vision_reads(clips):
    from qwenvl_cli.media.vision import video_plan

    defaults = VisionDefaults.from_flags(max_pixels=300 * 784)
    for ref, item in ((clips["mp4"], {"fps": 3.0}), (clips["mov"], {"nframes": 6, "video_start": 0.4}),
                      (clips["frames"], {})):
        item = {"type": "video", "video": str(ref), **item}
        _, _, _, infos = prepare_vision([{"role": "user", "content": [item]}], defaults)
        plan = video_plan(resolve_video(str(ref)), defaults, item)
        assert plan == infos[0].__class__(**{**infos[0].__dict__, "indices": None}), ref


def test_high_bit_depth_colour_conversion_is_within_the_documented_bound(tmp_path):
    """decord's bundled FFmpeg converts 10-bit chroma differently; docs/media.md bounds it."""
    import decord

    path = tmp_path / "ten.mp4"
    yy, xx = np.mgrid[0:96, 0:128]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p10le"
        for index in range(6):
            pixels = np.stack([(xx * 2 + index * 10) % 256, yy * 2 % 256, (xx + yy + index * 20) % 256], -1)
            pixels = pixels.astype(np.uint8)
            pixels[32:48, 40:64] = (200, 30, 60)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with video.VideoFile(path) as clip:
        got = clip.read(list(range(6))).astype(int)
    expected = decord.VideoReader(str(path)).get_batch(list(range(6))).asnumpy().astype(int)
    diff = np.abs(got - expected)
    assert diff.max() <= 96 and diff.mean() < 2.0  # measured: 80 and 0.89


@pytest.mark.parametrize("name,codec,options", [
    ("clip.ts", "libx264", {"x264-params": "scenecut=0:bframes=3"}),  # seeks land on any packet
    ("clip.mpg", "mpeg2video", {"bf": "2"}),  # key frame flags are unreliable
    ("clip.flv", "libx264", {"x264-params": "scenecut=0:bframes=3"}),  # no seek index
])
def test_containers_that_seek_badly_still_give_the_right_frames(tmp_path, name, codec, options):
    path = make_video(tmp_path / name, 10, 30, 64, 48, codec=codec, gop=60, options=options)
    with av.open(str(path)) as container:  # the truth: every frame, decoded in order
        decoded = sorted(((f.pts, f.to_ndarray(format="rgb24")) for f in container.decode(video=0)),
                         key=lambda item: item[0])
    truth = np.stack([pixels for _, pixels in decoded])
    with video.VideoFile(path) as clip:
        assert clip.total == len(truth) == 300
        for indices in ([0, 299], [58, 59, 60, 61, 119, 120, 121, 299], [150, 151, 290], [5, 5, 4]):
            got = clip.read(indices)
            assert np.array_equal(got, truth[indices]), indices
            assert clip.seeker.restarts <= 2  # bounded: after two restarts it stops seeking


def test_processor_kwargs_feed_a_transformers_processor(clips, tmp_path):
    """qwen-vl-utils' fps list is refused by transformers 5.x; qvl's processor kwargs are
    accepted and give the tensors a scalar fps gives (fps does not change Qwen2-VL's)."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    vocab = {token: i for i, token in enumerate(specials + ["[UNK]", "what", "moves"])}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]",
                                                     pad_token="<|endoftext|>", additional_special_tokens=specials)
    tokenizer.image_token, tokenizer.video_token = "<|image_pad|>", "<|video_pad|>"
    processor = transformers.Qwen2VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(), tokenizer=tokenizer,
        video_processor=transformers.Qwen2VLVideoProcessor(cap_pixels_per_frame=True))
    image = make_image(tmp_path / "still.png", 300, 200)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(image)},
                                             {"type": "video", "video": str(clips["mp4"]), "fps": 3.0}]}]
    inputs = prepare_vision(messages, REFERENCE_DEFAULTS)
    text = "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|> what moves"
    ours = processor(text=[text], images=inputs.images, videos=inputs.videos, **inputs.processor_kwargs(),
                     return_tensors="pt")
    scalar = processor(text=[text], images=inputs.images, videos=inputs.videos, do_sample_frames=False,
                       fps=inputs.video_kwargs["fps"][0], return_tensors="pt")
    assert sorted(ours) == sorted(scalar) and all(torch.equal(ours[k], scalar[k]) for k in ours)
    tokens = [int(g.prod()) // 4 for g in (*ours["image_grid_thw"], *ours["video_grid_thw"])]
    assert tokens == [info.tokens for info in inputs.infos]
    assert int((ours["input_ids"] == vocab["<|video_pad|>"]).sum()) == inputs.infos[1].tokens
