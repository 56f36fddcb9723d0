"""Videos' moments (cliplens.video): which frames are chosen, at what times, upright, and
the typed errors of damaged files; real videos written with PyAV from real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from cliplens.errors import InvalidInputError
from cliplens.preprocess import Preprocessing
from cliplens.video import VideoError, VideoSampling, frame_at, is_video, read_moments
from tests_helpers import make_video

PREP = Preprocessing(64, 64, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
CAT, ROCKET, COFFEE = data.chelsea(), data.rocket(), data.coffee()


def _looks_like(image: Image.Image | np.ndarray, photo: np.ndarray) -> float:
    """Mean absolute difference (0-255) between an image and a photo at 32x32."""
    a = np.asarray(Image.fromarray(np.asarray(image)).convert("RGB").resize((32, 32)), float)
    b = np.asarray(Image.fromarray(photo).resize((32, 32)), float)
    return float(np.abs(a - b).mean())


def test_a_moment_at_each_new_scene_and_none_in_a_still_shot(tmp_path):
    clip = make_video(tmp_path / "three.mp4", [(CAT, 2.0), (ROCKET, 1.3), (COFFEE, 2.2)])
    moments = read_moments(str(clip), PREP)
    assert moments.times_ms == [0, 2000, 3300]  # the first frame of each shot, exactly
    assert moments.crops.shape == (3, 64, 64, 3) and moments.crops.dtype == np.uint8
    assert moments.duration == pytest.approx(5.5, abs=0.15)
    for crop, photo in zip(moments.crops, (CAT, ROCKET, COFFEE), strict=True):
        others = [p for p in (CAT, ROCKET, COFFEE) if p is not photo]
        assert _looks_like(crop, photo) < min(_looks_like(crop, o) for o in others)


def test_the_minimum_gap_defers_a_cut_and_the_maximum_gap_fills_a_long_shot(tmp_path):
    quick = make_video(tmp_path / "quick.mp4", [(CAT, 2.0), (ROCKET, 0.4), (COFFEE, 2.0)])
    # the coffee shot starts 0.4 s after the rocket's moment: its moment waits for min_gap
    assert read_moments(str(quick), PREP, VideoSampling(min_gap=1.0)).times_ms == [0, 2000, 3000]
    assert read_moments(str(quick), PREP, VideoSampling(min_gap=0.3)).times_ms == [0, 2000, 2400]
    long_shot = make_video(tmp_path / "long.mp4", [(CAT, 5.0)])
    assert read_moments(str(long_shot), PREP).times_ms == [0]  # noise is no new view
    sampling = VideoSampling(min_gap=0.5, max_gap=2.0)
    assert read_moments(str(long_shot), PREP, sampling).times_ms == [0, 2000, 4000]
    capped = VideoSampling(min_gap=0.5, max_gap=2.0, max_frames=2)
    assert read_moments(str(long_shot), PREP, capped).times_ms == [0, 2000]


def test_stored_moments_are_read_again_as_they_were(tmp_path):
    clip = make_video(tmp_path / "three.mp4", [(CAT, 2.0), (ROCKET, 1.3), (COFFEE, 2.2)])
    first = read_moments(str(clip), PREP)
    again = read_moments(str(clip), PREP, VideoSampling(min_gap=5.0), at_ms=first.times_ms)
    assert again.times_ms == first.times_ms
    np.testing.assert_array_equal(again.crops, first.crops)
    # moments chosen among every frame (B-frames too) are read again at their own times
    # by a reader whose sampling skips those frames (as another model's index may)
    busy = make_video(tmp_path / "busy.mp4", [(CAT, 4.0)], fps=30)
    fine = read_moments(str(busy), PREP, VideoSampling(min_gap=0.1, max_gap=0.5, all_frames=True))
    coarse = VideoSampling(min_gap=0.1, max_gap=0.5)
    assert read_moments(str(busy), PREP, coarse).times_ms != fine.times_ms  # they differ
    assert read_moments(str(busy), PREP, coarse, at_ms=fine.times_ms).times_ms == fine.times_ms


@pytest.mark.parametrize("name", ["clip.webm", "clip.mkv", "clip.avi", "clip.mov"])
def test_every_container_people_keep_is_read(tmp_path, name):
    clip = make_video(tmp_path / name, [(CAT, 1.5), (ROCKET, 1.5)])
    assert is_video(clip)
    assert read_moments(str(clip), PREP).times_ms == [0, 1500]


def test_a_frame_at_a_moment_is_the_one_shown_then(tmp_path):
    clip = make_video(tmp_path / "two.mp4", [(CAT, 2.0), (ROCKET, 2.0)])
    for seconds, photo, other in ((0.5, CAT, ROCKET), (3.2, ROCKET, CAT)):
        image = frame_at(str(clip), seconds, max_side=100)
        assert max(image.size) == 100
        assert _looks_like(image, photo) < _looks_like(image, other)


def test_a_rotated_phone_video_is_read_upright(tmp_path):
    # a sensor's landscape frames with the display matrix that turns them a quarter turn
    clip = make_video(tmp_path / "portrait.mp4", [(CAT, 1.0)], size=(320, 240), rotation=90)
    image = frame_at(str(clip), 0.0, max_side=320)
    assert image.size == (240, 320)  # shown portrait
    upright = np.asarray(Image.fromarray(CAT).rotate(90, expand=True))
    unturned = np.asarray(Image.fromarray(CAT).rotate(-90, expand=True))
    assert _looks_like(image, upright) < _looks_like(image, unturned) - 10
    crop = read_moments(str(clip), Preprocessing(64, 64, (0, 0, 0), (1, 1, 1))).crops[0]
    assert _looks_like(crop, upright[40:280]) < _looks_like(crop, unturned[40:280])


def test_damaged_videos_get_typed_errors_with_a_reason(tmp_path):
    whole = make_video(tmp_path / "whole.mp4", [(CAT, 3.0), (ROCKET, 3.0)]).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole[: len(whole) * 3 // 4])
    with pytest.raises(VideoError, match=r"truncated: its frames end at \d+\.\d s of the 6\.0 s"):
        read_moments(str(cut), PREP)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all")
    with pytest.raises(VideoError, match="not a readable video"):
        read_moments(str(text), PREP)
    empty = tmp_path / "empty.webm"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match="not a readable video"):
        read_moments(str(empty), PREP)


def test_a_file_with_sound_only_holds_no_video_stream(tmp_path):
    import av

    path = tmp_path / "voice.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        samples = np.zeros((1, 16000), np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    with pytest.raises(VideoError, match="no video stream"):
        read_moments(str(path), PREP)


def _with_sound(path: Path, video_s: float, sound_s: float) -> Path:
    """A video track of `video_s` seconds beside a silent sound track of `sound_s`."""
    import av

    video_codec = "libvpx-vp9" if path.suffix == ".webm" else "libx264"
    sound_codec, layout = ("libopus", "flt") if path.suffix == ".webm" else ("aac", "fltp")
    with av.open(str(path), "w") as out:
        video = out.add_stream(video_codec, rate=10)
        video.width, video.height, video.pix_fmt = 160, 120, "yuv420p"
        sound = out.add_stream(sound_codec, rate=48000)
        for i in range(round(video_s * 10)):
            picture = np.full((120, 160, 3), (i * 8) % 256, np.uint8)
            out.mux(video.encode(av.VideoFrame.from_ndarray(picture)))
        out.mux(video.encode())
        for i in range(round(sound_s * 48000 / 960)):
            samples = av.AudioFrame.from_ndarray(np.zeros((1, 960), np.float32), layout, "mono")
            samples.sample_rate, samples.pts = 48000, i * 960
            out.mux(sound.encode(samples))
        out.mux(sound.encode())
    return path


@pytest.mark.parametrize("name", ["clip.webm", "clip.mkv", "clip.mp4"])
def test_a_sound_track_longer_than_the_video_is_no_sign_of_a_cut(tmp_path, name):
    """Matroska and WebM state no length per stream: the container's is the longer sound
    track's, and the video's own (its DURATION tag) is the one its frames must reach."""
    clip = _with_sound(tmp_path / name, video_s=3.0, sound_s=5.0)
    assert read_moments(str(clip), PREP).times_ms[0] == 0


def test_a_codec_this_ffmpeg_cannot_decode_is_a_video_error(tmp_path):
    whole = make_video(tmp_path / "whole.mp4", [(CAT, 1.0)]).read_bytes()
    unknown = tmp_path / "unknown.mp4"
    unknown.write_bytes(whole.replace(b"avc1", b"zzz9"))  # a codec tag no decoder claims
    with pytest.raises(VideoError, match="no decoder for the video's codec"):
        read_moments(str(unknown), PREP)
    with pytest.raises(VideoError, match="no decoder for the video's codec"):
        frame_at(str(unknown), 0.0, 64)


def test_a_frame_ffmpeg_cannot_convert_is_a_video_error(tmp_path, monkeypatch):
    import av

    import cliplens.video

    clip = make_video(tmp_path / "clip.mp4", [(CAT, 1.0)])

    def refused(frame, short_side):
        raise av.error.FFmpegError(22, "Invalid argument")

    monkeypatch.setattr(cliplens.video, "_upright", refused)
    with pytest.raises(VideoError, match=r"its frame at 0\.0 s cannot be converted: invalid arg"):
        read_moments(str(clip), PREP)


def test_sampling_refuses_gaps_that_cannot_work():
    with pytest.raises(InvalidInputError, match="`min_gap` <= `max_gap`"):
        VideoSampling(min_gap=3, max_gap=2)
    with pytest.raises(InvalidInputError, match="`min_gap`"):
        VideoSampling(min_gap=0)
    with pytest.raises(InvalidInputError, match="`change`"):
        VideoSampling(change=1.5)
    with pytest.raises(InvalidInputError, match="`max_frames`"):
        VideoSampling(max_frames=0)


def test_videos_are_known_by_their_extension():
    assert is_video("a/trip.MP4") and is_video(Path("b.webm")) and is_video("c.mov")
    assert not is_video("cat.jpg") and not is_video("raw.dng") and not is_video("mp4")
