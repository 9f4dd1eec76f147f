"""featdeid Space: upload or webcam photo -> every face de-identified.

Run locally (127.0.0.1, port from ``--port``, ``PORT`` or ``GRADIO_SERVER_PORT``, default 7860)::

    python space/app.py [--model MODEL_FOLDER_OR_HUB_ID] [--port 7860]

The model is ``--model``, else ``FEATDEID_MODEL``, else the default model shipped in the package.
Every photo goes through :class:`featdeid.Deidentifier` (the same core as the library, the CLI and
the integrations); this file only adds the web page: limits, a preview with face boxes, a
per-face protection score under dlib's recogniser, and a PNG download.

API (``gradio_client``)::

    from gradio_client import Client, handle_file
    image_png, report = Client("http://127.0.0.1:7860/").predict(
        handle_file("group.jpg"), 1.0, 0, "auto", api_name="/deidentify")
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import featdeid
from featdeid import images as fimages
from featdeid.errors import FeatdeidError
from featdeid.faces.align import extract_faces
from featdeid.faces.detect import available_detectors

MAX_PIXELS = int(os.environ.get("FEATDEID_SPACE_MAX_PIXELS", 25_000_000))  # 25 MP, e.g. 6000 x 4000
MAX_BYTES = int(os.environ.get("FEATDEID_SPACE_MAX_BYTES", 20 * 1024 * 1024))  # 20 MiB per upload
CONCURRENCY = int(os.environ.get("FEATDEID_SPACE_CONCURRENCY", 2))  # photos processed at once
KEEP_SECONDS = 3600  # results on disk are deleted after an hour
DLIB_MATCH_DISTANCE = 0.6  # dlib's documented threshold: descriptors closer than this are "the same person"
SCORE_FRAME = 256  # canonical frame size fed to the dlib recogniser

EMPTY_STATE = (
    "**Upload a photo of your own** (or take one with the webcam), then press **De-identify**. "
    "No example photos are bundled: we only show pictures of people who agreed to it, so bring your own. "
    f"Limits: {MAX_PIXELS / 1e6:.0f} megapixels and {MAX_BYTES / 2**20:.0f} MB per photo. "
    "Results are kept on the server for at most an hour."
)


@dataclasses.dataclass
class Result:
    """Everything one request produces (one photo)."""

    before: Image.Image  # upright, 8-bit, for display
    after_png: str  # path of the de-identified photo, lossless PNG, metadata stripped
    preview: Image.Image  # upright original with numbered face boxes
    rows: list[list[Any]]  # per-face table
    message: str  # plain-language summary (markdown)
    report: dict[str, Any]


class SpaceBackend:
    """Loads the model once; de-identifies uploads; scores each face under dlib's recogniser."""

    def __init__(self, model: str | os.PathLike | None = None, workdir: str | os.PathLike | None = None) -> None:
        self.model = featdeid.load(model) if model is not None else featdeid.load()
        self.detectors = available_detectors()
        self._runners: dict[str, featdeid.Deidentifier] = {}
        self._lock = threading.Lock()
        self._recogniser: Any = None
        self._recogniser_error: str | None = None
        self._rec_lock = threading.Lock()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="featdeid-space-"))
        self.workdir.mkdir(parents=True, exist_ok=True)

    # -- core -------------------------------------------------------------------------------
    def runner(self, detector: str) -> featdeid.Deidentifier:
        detector = detector or "auto"
        if detector != "auto" and detector not in self.detectors:
            raise FeatdeidError(f"detector {detector!r} is not installed here; choose one of: auto, {', '.join(self.detectors)}")
        with self._lock:
            if detector not in self._runners:
                self._runners[detector] = featdeid.Deidentifier(self.model, detector=detector)
            return self._runners[detector]

    def recogniser(self) -> Any:
        """dlib's ResNet recogniser (a local black box), or None where dlib is not installed."""
        with self._rec_lock:
            if self._recogniser is None and self._recogniser_error is None:
                try:
                    from featdeid.recognisers import load_recogniser

                    self._recogniser = load_recogniser("dlib")
                except FeatdeidError as e:
                    self._recogniser_error = str(e)
            return self._recogniser

    def protection(self, original: np.ndarray, changed: np.ndarray, faces: list[Any]) -> list[tuple[float, float] | None]:
        """Per face: (cosine similarity, dlib distance) of original vs de-identified, same alignment."""
        rec = self.recogniser()
        if rec is None or not faces:
            return [None] * len(faces)
        before, _ = extract_faces(original, faces, SCORE_FRAME)
        after, _ = extract_faces(changed, faces, SCORE_FRAME)
        with self._rec_lock:  # dlib's network is not safe to share between threads
            raw = rec.model.compute_face_descriptor(rec.chips(before) + rec.chips(after))
        d = np.asarray([np.asarray(v) for v in raw], dtype=np.float64)
        a, b = d[: len(faces)], d[len(faces) :]
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        dist = np.linalg.norm(a - b, axis=1)
        return [(float(c), float(x)) for c, x in zip(cos, dist)]

    def check_upload(self, path: str | None) -> Path:
        if not path:
            raise FeatdeidError("no photo: upload one or take one with the webcam")
        p = Path(path)
        size = p.stat().st_size
        if size > MAX_BYTES:
            raise FeatdeidError(f"the file is {size / 2**20:.1f} MB; the limit here is {MAX_BYTES / 2**20:.0f} MB")
        try:
            with Image.open(p) as im:  # reads the header only
                w, h = im.size
        except Exception as e:
            raise FeatdeidError(f"not a readable image ({type(e).__name__})") from e
        if w * h > MAX_PIXELS:
            raise FeatdeidError(
                f"the photo is {w} x {h} = {w * h / 1e6:.1f} megapixels; the limit here is {MAX_PIXELS / 1e6:.0f}. "
                "Downscale it, or run featdeid on your own machine (no limit)."
            )
        return p

    def _new_dir(self) -> Path:
        now = time.time()
        for old in self.workdir.iterdir():  # forget results older than KEEP_SECONDS
            try:
                if now - old.stat().st_mtime > KEEP_SECONDS:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                pass
        return Path(tempfile.mkdtemp(dir=self.workdir))

    def run(self, path: str | None, strength: float | None = None, seed: int | float | None = None, detector: str = "auto") -> Result:
        t0 = time.perf_counter()
        src = self.check_upload(path)
        runner = self.runner(detector)
        seed = _parse_seed(seed)
        if strength is None:
            strength = runner.default_strength
        img = fimages.open_image(src)
        out, report = runner(img, strength=float(strength), seed=seed, return_report=True)
        upright_in = fimages.from_pil(img).rgb
        upright_out = fimages.from_pil(out).rgb
        faces = [r.face for r in report.faces]
        scores = self.protection(upright_in, upright_out, faces)
        baked = fimages.bake_orientation(out)
        if baked.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
            baked = baked.convert("RGBA" if "A" in baked.getbands() else "RGB")
        folder = self._new_dir()
        after_png = folder / f"{(Path(path).stem or 'photo')[:60]}-deidentified.png"
        fimages.atomic_write(fimages.encode(baked, "PNG"), after_png)
        before = _display(fimages.bake_orientation(img))
        seconds = time.perf_counter() - t0
        rows, details = [], []
        for i, (fr, sc) in enumerate(zip(report.faces, scores), 1):
            meaning = _meaning(fr.status, sc)
            status = fr.status.replace("_", " ") + (" (low confidence)" if fr.low_confidence else "")
            rows.append([i, status, round(fr.face.size), round(fr.face.score, 2), None if sc is None else round(sc[0], 3),
                         None if sc is None else round(sc[1], 3), meaning])
            details.append({**fr.to_dict(), "cosine_dlib": None if sc is None else round(sc[0], 4),
                            "distance_dlib": None if sc is None else round(sc[1], 4), "meaning": meaning})
        rep = {**report.to_dict(), "details": details, "strength": float(strength), "seconds": round(seconds, 3),
               "size": list(baked.size), "dlib_match_distance": DLIB_MATCH_DISTANCE}
        return Result(before, str(after_png), _draw_boxes(before, report), rows, _summary(report, scores, seconds, self._recogniser_error), rep)


def _parse_seed(seed: Any) -> int | None:
    """None / "" -> None (derived from the photo); whole numbers (int, float, text) -> int."""
    if seed is None or (isinstance(seed, str) and not seed.strip()):
        return None
    try:
        if isinstance(seed, str):
            value = int(seed.strip())
        elif isinstance(seed, float):
            if not seed.is_integer():
                raise ValueError
            value = int(seed)
        else:
            value = int(seed)
    except (TypeError, ValueError, OverflowError):
        raise FeatdeidError(f"the seed must be a whole number (or empty), got {seed!r}") from None
    if value < 0:
        raise FeatdeidError("the seed must be 0 or more")
    return value


def _display(img: Image.Image) -> Image.Image:
    """An 8-bit RGB(A) copy for the browser."""
    if img.mode in ("RGB", "RGBA"):
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr / (65535.0 if arr.max() > 255 else 255.0) * 255, 0, 255).astype(np.uint8))
    return img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")


def _meaning(status: str, score: tuple[float, float] | None) -> str:
    if status == "too_small":
        return "NOT protected: too small to process (left unchanged)"
    if status == "unchanged":
        return "unchanged (strength 0)"
    if score is None:
        return "de-identified (no dlib here to score it)"
    if score[1] > DLIB_MATCH_DISTANCE:
        return "not matched: dlib does not see the same person"
    return "still matched by dlib: try a higher strength or another seed"


def _summary(report: Any, scores: list[Any], seconds: float, rec_error: str | None) -> str:
    n = len(report.faces)
    if n == 0:
        return ("**No faces found in this photo**, so nothing was changed. featdeid looks for frontal faces "
                "at least 20 pixels tall; try a larger or sharper photo, or another detector.")
    changed = report.changed
    lines = [f"**{n} face{'s' if n != 1 else ''} found, {changed} de-identified** in {seconds:.1f} s."]
    if report.skipped:
        lines.append(f"⚠️ **{report.skipped} face{'s were' if report.skipped != 1 else ' was'} too small** "
                     "(under 20 pixels) and left unchanged: they are **not protected**. Use a larger photo.")
    scored = [s for s, f in zip(scores, report.faces) if s is not None and f.status == "changed"]
    if scored:
        unmatched = sum(s[1] > DLIB_MATCH_DISTANCE for s in scored)
        lines.append(f"dlib's face recogniser no longer matches **{unmatched} of {len(scored)}** de-identified faces "
                     f"with the original (match = distance ≤ {DLIB_MATCH_DISTANCE}; lower similarity = better protection).")
    elif rec_error:
        lines.append(f"(No protection score: {rec_error})")
    return "  \n".join(lines)


def _draw_boxes(img: Image.Image, report: Any) -> Image.Image:
    """The photo (at most 1600 px) with a box per face labelled with its number and detector score: green
    changed, amber changed but low-confidence (perhaps not a face), red left unchanged."""
    prev = img.convert("RGB")
    scale = min(1.0, 1600 / max(prev.size))
    if scale < 1:
        prev = prev.resize((max(1, round(prev.width * scale)), max(1, round(prev.height * scale))), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(prev)
    width = max(2, round(max(prev.size) / 400))
    try:
        font = ImageFont.load_default(size=max(14, round(max(prev.size) / 30)))
    except TypeError:
        font = ImageFont.load_default()
    for i, fr in enumerate(report.faces, 1):
        x0, y0, x1, y1 = (float(v) * scale for v in fr.face.box)
        colour = ((230, 160, 20) if fr.low_confidence else (40, 200, 80)) if fr.status == "changed" else (230, 40, 40)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        label = f"{i} · {fr.face.score:.2f}"
        tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), label, font=font)
        tw, th = tx1 - tx0 + 2 * width, ty1 - ty0 + 2 * width
        # above the box; below it for faces at the top edge (the component's label covers that strip)
        lx = max(0.0, x0)
        ly = y0 - th if y0 - th >= 2 * th else (y1 if y1 + th <= prev.height else max(0.0, y0))
        draw.rectangle([lx, ly, lx + tw, ly + th], fill=colour)
        draw.text((lx + width - tx0, ly + width - ty0), label, fill=(255, 255, 255), font=font)
    return prev


# -- the web page ---------------------------------------------------------------------------------
def theme() -> Any:
    """Gradio's Soft theme with system fonts (no font downloads from third parties)."""
    import gradio as gr

    return gr.themes.Soft(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def build_app(backend: SpaceBackend) -> Any:
    import gradio as gr

    def run_ui(path, strength, seed, detector):
        if not path:
            return None, None, None, [], EMPTY_STATE, None, gr.update(visible=False)
        try:
            r = backend.run(path, strength, seed, detector)
        except FeatdeidError as e:
            raise gr.Error(str(e)) from e
        if not r.report["faces"]:
            gr.Warning("No faces found in this photo: nothing was changed.")
        elif r.report["skipped"]:
            gr.Warning(f"{r.report['skipped']} face(s) too small: left unchanged.")
        return r.after_png, (r.before, r.after_png), r.preview, r.rows, r.message, r.report, gr.update(value=r.after_png, visible=True)

    def run_api(photo, strength, seed, detector):
        """De-identify every face of a photo: returns the PNG and a report (faces, status, dlib scores)."""
        try:
            r = backend.run(photo, strength, seed, detector)
        except FeatdeidError as e:
            raise gr.Error(str(e)) from e
        return r.after_png, r.report

    def new_seed():
        return str(secrets.randbelow(2**31))

    detector_choices = ["auto", *backend.detectors]
    with gr.Blocks(title="featdeid: de-identify faces", analytics_enabled=False, delete_cache=(1800, KEEP_SECONDS)) as demo:
        gr.Markdown(
            "# featdeid: de-identify every face in a photo\n"
            "The photo still looks the same to people, but face recognition no longer matches the people in it: "
            "each face carries the identity feature of a person who does not exist (Hanawa, Ito & Aoki, 2024). "
            "Pixels outside the faces are untouched; metadata (EXIF, GPS) is removed."
        )
        with gr.Row():
            with gr.Column():
                photo = gr.Image(label="Your photo", type="filepath", image_mode=None,
                                 sources=["upload", "webcam", "clipboard"], elem_id="photo")
                strength = gr.Slider(0, 2, value=backend.model.config.default_strength, step=0.05, label="Strength",
                                     info="0 = unchanged, 1 = the model's output, more = stronger")
                with gr.Row():
                    seed = gr.Textbox(label="Seed (empty: derived from the photo)", value="", max_lines=1,
                                      placeholder="from the photo", elem_id="seed")
                    detector = gr.Dropdown(detector_choices, value="auto", label="Face detector",
                                           visible=len(backend.detectors) > 1)
                with gr.Row():
                    run_btn = gr.Button("De-identify", variant="primary", elem_id="run")
                    new_btn = gr.Button("New identities", elem_id="new-identities")
            with gr.Column():
                slider = gr.ImageSlider(label="Before / after", type="filepath", format="png", elem_id="before-after")
                message = gr.Markdown(EMPTY_STATE, elem_id="message")
                download = gr.DownloadButton("Download PNG", visible=False, elem_id="download")
        with gr.Row():
            preview = gr.Image(label="Detected faces with detector scores (green: changed; amber: changed, low confidence; red: left unchanged)",
                               format="png", interactive=False, elem_id="preview")
            result = gr.Image(label="De-identified photo (PNG)", type="filepath", format="png", interactive=False,
                              elem_id="result")
        table = gr.Dataframe(headers=["face", "status", "size px", "detector score", "similarity (dlib cosine)", "dlib distance", "meaning"],
                             label="Protection per face (original vs de-identified under dlib's recogniser; "
                                   f"dlib matches at distance ≤ {DLIB_MATCH_DISTANCE})",
                             interactive=False, wrap=True, elem_id="scores")
        with gr.Accordion("Report (JSON)", open=False):
            report = gr.JSON(label="report")
        api_seed = gr.Number(label="seed", value=None, precision=0, visible=False)  # None: derived from the photo
        api_image = gr.Image(label="deidentified", type="filepath", format="png", visible=False)
        api_report = gr.JSON(label="report", visible=False)

        ui_inputs = [photo, strength, seed, detector]
        ui_outputs = [result, slider, preview, table, message, report, download]
        common = dict(concurrency_limit=CONCURRENCY, concurrency_id="featdeid")
        run_btn.click(run_ui, ui_inputs, ui_outputs, api_visibility="private", **common)
        new_btn.click(new_seed, None, seed, api_visibility="private", queue=False).then(
            run_ui, ui_inputs, ui_outputs, api_visibility="private", **common)
        photo.clear(lambda: (None, None, None, [], EMPTY_STATE, None, gr.update(visible=False)), None, ui_outputs,
                    api_visibility="private", queue=False)
        api_btn = gr.Button(visible=False)
        api_btn.click(run_api, [photo, strength, api_seed, detector], [api_image, api_report], api_name="deidentify", **common)
        gr.Markdown(
            "Scores use dlib's ResNet, a recogniser featdeid was not trained against (a black box). "
            "They describe this photo only: other recognisers may still match. "
            "On your own machine, the featdeid package does the same for whole folders: `featdeid photos/ -o out/`."
        )
    return demo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="featdeid Gradio Space")
    p.add_argument("--model", default=os.environ.get("FEATDEID_MODEL") or None,
                   help="model folder or Hub repo id (default: FEATDEID_MODEL, else the model shipped in the package)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT") or 7860))
    args = p.parse_args(argv)
    try:
        backend = SpaceBackend(args.model)
    except FeatdeidError as e:
        print(f"featdeid space: error: {e}\nPass --model FOLDER or set FEATDEID_MODEL.", file=sys.stderr)
        return 2
    backend.recogniser()  # load dlib now, not on the first request
    demo = build_app(backend)
    demo.queue(default_concurrency_limit=CONCURRENCY)
    demo.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_BYTES, ssr_mode=False,
                theme=theme(), show_error=True, footer_links=["api"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
