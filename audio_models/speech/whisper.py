"""whisperX: faster-whisper (CTranslate2) transcription, VAD, forced word alignment and
optional speaker diarization, as one transcription extractor.

How it fits the loop: loader workers decode and resample each file to 16 kHz mono (ahead of
the device, in parallel); ``forward`` gets the loader's batch of files on the host (whisperX
takes numpy audio and moves its own work to the device). whisperX's ``transcribe`` batches the
VAD chunks of one file, so a corpus of short clips (one chunk each) would decode one chunk at a
time; here the steps of ``transcribe`` run over the whole batch of files instead: VAD and chunk
merging per file, then the chunks of all files, ``batch_size`` at a time, through the same
batched decode (per language), then each file's segments through ``align`` (and
``assign_word_speakers``). A chunk is decoded on its own (padded to 30 s, its own prompt), so
its text does not depend on which chunks share its batch: the result is what ``transcribe`` +
``align`` give file by file (tested). One model of each kind lives on the device for the run.

Offline: the Whisper model is a size name / hub id (downloaded once into the hub cache) or a
local CTranslate2 directory; the pyannote VAD model ships inside the whisperx package; the
alignment model is a torchaudio bundle name, a hub id or a local ``Wav2Vec2ForCTC`` directory;
NLTK's ``punkt_tab`` sentence splitter, which ``whisperx.align`` would download at run time, is
taken from NLTK's data path when installed, else an untrained Punkt model (no abbreviation
list) is provided so alignment never reaches for the network. Anything missing is a
:class:`UserError` before any work, naming what is missing and how to supply it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from audio_models.extractor import Extractor, OutputKind, Placement, Segment, Transcript, Word
from audio_models.registry import register_extractor
from audio_models.speech.hub import hub_offline, weights_sha256
from audio_models.utils.errors import UserError
from audio_models.utils.paths import default_cache_dir
from audio_models.utils.provenance import sha256_file

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

VAD_METHODS = ("pyannote", "silero")
#: The way out of every missing-aligner error: another aligner, or none.
_NO_ALIGNER = (
    "or set extractor.align_model to a local Wav2Vec2ForCTC directory, or set "
    "extractor.align=false (transcripts and segments without word times)"
)
#: Files an untrained Punkt model needs in ``tokenizers/punkt_tab/<language>/``.
_PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")


def ensure_punkt(language: str) -> str:
    """Make ``nltk.data.load('tokenizers/punkt_tab/<punkt language>.pickle')`` work offline.

    Returns ``punkt_tab`` when NLTK's trained model is installed, else ``untrained-punkt``
    after providing an untrained model (empty parameters: it still splits after sentence
    punctuation, but knows no abbreviations) under ``default_cache_dir()/nltk_data``, which is
    appended to NLTK's search path, so an installed trained model always wins.
    """
    import nltk
    from whisperx.utils import PUNKT_LANGUAGES

    name = PUNKT_LANGUAGES.get(language, "english")
    root = default_cache_dir() / "nltk_data"
    folder = root / "tokenizers" / "punkt_tab" / name
    try:
        found = Path(str(nltk.data.find(f"tokenizers/punkt_tab/{name}/")))
        return "untrained-punkt" if found.resolve() == folder.resolve() else "punkt_tab"
    except LookupError:
        pass
    folder.mkdir(parents=True, exist_ok=True)
    for file in _PUNKT_FILES:
        (folder / file).touch()
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    log.warning(
        "NLTK punkt_tab (%s) is not installed: sentence splitting for alignment uses an "
        "untrained Punkt model (install it with: python -m nltk.downloader punkt_tab)",
        name,
    )
    return "untrained-punkt"


def _whisper_folder(model: str, revision: str | None, download_root: str | None) -> Path:
    """The local CTranslate2 directory of ``model`` (downloading a hub model once)."""
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "model.bin").is_file():
            raise UserError(
                f"extractor.model={model!r} is a directory without model.bin: not a CTranslate2 "
                "Whisper model (convert one with ct2-transformers-converter, and copy "
                "tokenizer.json and preprocessor_config.json into it)"
            )
        return local
    from faster_whisper.utils import download_model

    try:
        return Path(
            download_model(
                model, cache_dir=download_root, revision=revision, local_files_only=hub_offline()
            )
        )
    except Exception as exc:  # no network, not cached, no such model
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"cannot load Whisper model {model!r}: {first}. Without network access, download it "
            f'first where there is network (python -c "from faster_whisper.utils import '
            f"download_model; download_model('{model}')\") or pass a local CTranslate2 "
            "directory as extractor.model"
        ) from None


#: OpenAI's multilingual Whisper vocabularies have 51865 tokens (large-v3: 51866), the
#: English-only ones 51864; CTranslate2 tells the two kinds apart by the vocabulary.
_MULTILINGUAL_VOCABULARY = 51865


def _vocabulary_size(folder: Path) -> int | None:
    """Tokens in a CTranslate2 model's vocabulary file (``None``: no such file)."""
    import json

    if (folder / "vocabulary.json").is_file():
        return len(json.loads((folder / "vocabulary.json").read_text(encoding="utf-8")))
    if (folder / "vocabulary.txt").is_file():
        with (folder / "vocabulary.txt").open(encoding="utf-8") as lines:
            return sum(1 for _ in lines)
    return None


def english_only(model: str, folder: Path) -> bool:
    """Whether a Whisper model is English-only (faster-whisper's ``is_multilingual`` false).

    A vocabulary of a multilingual Whisper's size says not; ``.en`` in its name (``tiny.en``,
    ``Systran/faster-whisper-small.en``, its folder or hub cache folder) says so. Anything else
    (a converted model in a folder of any name, such as a packaged ``tiny.en``) is asked of
    CTranslate2 itself, which reads the weights once on the CPU: only models with a vocabulary
    smaller than a multilingual one's get there, and those are small.
    """
    size = _vocabulary_size(folder)
    if size is None or size >= _MULTILINGUAL_VOCABULARY:
        return False
    names = [model, folder.name, *(part for part in folder.parts if part.startswith("models--"))]
    if any(name.rstrip("/").endswith(".en") for name in names):
        return True
    import ctranslate2

    return not ctranslate2.models.Whisper(str(folder), device="cpu").is_multilingual


def _align_model_name(language: str, align_model: str | None) -> str:
    from whisperx.alignment import DEFAULT_ALIGN_MODELS_HF, DEFAULT_ALIGN_MODELS_TORCH

    if align_model is not None:
        return align_model
    name = DEFAULT_ALIGN_MODELS_TORCH.get(language) or DEFAULT_ALIGN_MODELS_HF.get(language)
    if name is None:
        raise UserError(
            f"whisperX has no default alignment model for language {language!r}: set "
            "extractor.align_model to a wav2vec2 CTC model (hub id or local directory), or "
            "extractor.align=false (transcripts and segments without word times)"
        )
    return name


def _check_torchaudio_bundle(name: str, model_dir: str | None) -> None:
    """A torchaudio bundle downloads its weights on first use: say so clearly when offline."""
    import torch
    import torchaudio

    bundle = torchaudio.pipelines.__dict__[name]
    folder = Path(model_dir) if model_dir else Path(torch.hub.get_dir()) / "checkpoints"
    weights = folder / Path(bundle._path).name
    if not weights.is_file() and hub_offline():
        raise UserError(
            f"alignment model {name} (a torchaudio bundle) is not downloaded: {weights} is "
            f"missing and there is no network (or HF_HUB_OFFLINE is set). Download it where "
            f'there is network (python -c "import torchaudio; '
            f'torchaudio.pipelines.{name}.get_model()") and copy the file there (or set '
            f"extractor.align_model_dir), {_NO_ALIGNER}"
        )


@dataclass
class WhisperXConfig:
    _target_: str = "audio_models.speech.whisper.WhisperXExtractor"
    name: str = "whisperx"
    model: str = "small"  # size name, CTranslate2 hub id, or local CTranslate2 directory
    revision: str | None = None
    compute_type: str = "default"  # default: float16 on CUDA, float32 on CPU
    batch_size: int = 16  # VAD chunks per batched decode, across the files of a loader batch
    language: str | None = None  # None: detected per file
    beam_size: int = 5
    max_new_tokens: int | None = None
    vad_method: str = "pyannote"  # pyannote (bundled, offline) | silero (downloads)
    vad_onset: float = 0.5
    vad_offset: float = 0.363
    chunk_size: int = 30
    align: bool = True
    align_model: str | None = None  # None: whisperX's default for the language
    align_model_dir: str | None = None
    interpolate_method: str = "nearest"
    diarize: bool = False
    diarize_model: str = "pyannote/speaker-diarization-community-1"
    hf_token_env: str = "HF_TOKEN"  # the token is read from this variable, never logged
    min_speakers: int | None = None
    max_speakers: int | None = None
    download_root: str | None = None
    sample_rate: int = 16000


@register_extractor("whisperx", config=WhisperXConfig)
class WhisperXExtractor(Extractor):
    """whisperX transcripts with segments, word times and (optionally) speakers.

    Args:
        name: extractor name.
        model: Whisper size name (``small``, ``large-v3``…), CTranslate2 hub id, or a local
            CTranslate2 directory (with ``tokenizer.json`` and ``preprocessor_config.json``).
        revision: hub revision of the Whisper model.
        compute_type: CTranslate2 compute type (``default``: float16 on CUDA, float32 on CPU).
        batch_size: VAD chunks decoded per batch (chunks of all files of a loader batch).
        language: language code, or ``None`` to detect it per file (first 30 s).
        beam_size: beam width.
        max_new_tokens: cap on tokens per chunk (``None``: the model's maximum).
        vad_method: ``pyannote`` (bundled with whisperx, offline) or ``silero`` (downloaded
            through torch.hub on first use).
        vad_onset, vad_offset: VAD hysteresis thresholds.
        chunk_size: longest merged VAD chunk in seconds.
        align: word times by forced alignment with a wav2vec2 CTC model.
        align_model: alignment model (torchaudio bundle name, hub id or local directory;
            ``None``: whisperX's default for the language).
        align_model_dir: where torchaudio bundles / hub models are cached.
        interpolate_method: how words without alignable characters get times.
        diarize: assign speakers with a pyannote diarization pipeline (needs a Hugging Face
            token in the environment variable ``hf_token_env``; never logged).
        diarize_model: the pyannote pipeline (hub id or local directory).
        hf_token_env: environment variable holding the token.
        min_speakers, max_speakers: diarization bounds.
        download_root: cache directory for Whisper models.
        sample_rate: must be 16000 (whisperX's rate).

    Raises:
        UserError: a missing model, token or invalid option, before any work.
    """

    kind = OutputKind.TRANSCRIPT
    placement = Placement.HOST

    def __init__(
        self,
        *,
        name: str = "whisperx",
        model: str = "small",
        revision: str | None = None,
        compute_type: str = "default",
        batch_size: int = 16,
        language: str | None = None,
        beam_size: int = 5,
        max_new_tokens: int | None = None,
        vad_method: str = "pyannote",
        vad_onset: float = 0.5,
        vad_offset: float = 0.363,
        chunk_size: int = 30,
        align: bool = True,
        align_model: str | None = None,
        align_model_dir: str | None = None,
        interpolate_method: str = "nearest",
        diarize: bool = False,
        diarize_model: str = "pyannote/speaker-diarization-community-1",
        hf_token_env: str = "HF_TOKEN",
        min_speakers: int | None = None,
        max_speakers: int | None = None,
        download_root: str | None = None,
        sample_rate: int = 16000,
    ) -> None:
        super().__init__(name=name, sample_rate=sample_rate)
        if sample_rate != 16000:
            raise UserError("extractor.sample_rate must be 16000 for whisperX")
        if vad_method not in VAD_METHODS:
            raise UserError(f"extractor.vad_method must be one of {VAD_METHODS}")
        if vad_method == "silero" and hub_offline():
            raise UserError(
                "vad_method=silero downloads the Silero model through torch.hub, which "
                "HF_HUB_OFFLINE forbids here: use vad_method=pyannote (bundled with whisperx)"
            )
        if batch_size < 1:
            raise UserError("extractor.batch_size must be at least 1")
        self._token: str | None = None
        if diarize:
            self._token = os.environ.get(hf_token_env) or None
            if self._token is None:
                raise UserError(
                    f"diarize=true needs a Hugging Face token for {diarize_model} in the "
                    f"environment variable {hf_token_env} (accept the model's terms on the hub, "
                    f"then export {hf_token_env}=hf_…); it is read from there and never logged"
                )
        self.model_id, self.revision, self.download_root = model, revision, download_root
        self.compute_type = compute_type
        self.batch_size = batch_size
        self.language = language
        self.asr_options: dict[str, Any] = {"beam_size": beam_size}
        self.max_new_tokens = max_new_tokens
        self.vad_method = vad_method
        self.vad_options = {"vad_onset": vad_onset, "vad_offset": vad_offset}
        self.chunk_size = chunk_size
        self.align = align
        self.align_model = align_model
        self.align_model_dir = align_model_dir
        self.interpolate_method = interpolate_method
        self.diarize = diarize
        self.diarize_model = diarize_model
        self.min_speakers, self.max_speakers = min_speakers, max_speakers
        self._aligners: dict[str, tuple[torch.nn.Module, dict[str, Any]]] = {}
        self._pipeline: Any = None
        self._tokenizers: dict[str, Any] = {}
        self._diarizer: Any = None
        self._device: torch.device | None = None
        self.folder: Path | None = None

    def load(self) -> None:
        """Find the CTranslate2 model (downloading it unless offline), check its language
        against the settings, and load the alignment model on the CPU, so a missing one
        stops the run before any work. The Whisper model itself loads in :meth:`on_device`."""
        if self.folder is not None:
            return
        # A retry after a failed load starts afresh: the aligners add their provenance tags.
        self._aligners = {}
        model, language = self.model_id, self.language
        folder = _whisper_folder(model, self.revision, self.download_root)
        english = language is None and english_only(model, folder)
        if language not in (None, "en") and english_only(model, folder):
            raise UserError(
                f"extractor.model={model!r} is an English-only Whisper model: set "
                f"extractor.language=en (or null), not {language!r}, or use a multilingual model"
            )
        if english:
            # whisperX's per-file language detection refuses English-only models (every item
            # would fail after the model loaded); faster-whisper's own transcribe takes such a
            # model as English, and so does this run, saying so.
            language = "en"
            log.warning(
                "extractor.model=%r is an English-only Whisper model: extractor.language=null "
                "runs as English (language detection needs a multilingual model)",
                model,
            )
        self._provenance = {
            "whisperx.model": model,
            "whisperx.model_dir": str(folder),
            "whisperx.model_sha256": sha256_file(folder / "model.bin"),
            "whisperx.vad": self.vad_method,
        }
        if english:
            # Only then: the tag (part of the settings hash) of every other run stays as it was.
            self._provenance["whisperx.language"] = "en (English-only model, language=null)"
        if self.vad_method == "pyannote":
            import whisperx

            bundled = Path(whisperx.__file__).parent / "assets" / "pytorch_model.bin"
            self._provenance["whisperx.vad_sha256"] = sha256_file(bundled)
        if self.align and language is not None:
            # Load (on the CPU) now: a missing alignment model stops the run before any work.
            self._aligner(language)
        if self.align:
            # punkt_tab is installed for all its languages or for none: one check tells which
            # splitter every language of the run gets.
            self._provenance["whisperx.sentence_splitter"] = ensure_punkt(language or "en")
        # Last: a load that failed half-way (say, a missing aligner) runs again in full.
        self.language, self.folder = language, folder

    @property
    def feature_names(self) -> list[str]:
        """The model score columns of ``transcripts.parquet``."""
        return ["avg_logprob"]

    @property
    def min_samples(self) -> int:
        return 400  # 25 ms: the shortest input the VAD and the aligner take

    def provenance(self) -> dict[str, str]:
        self.load()
        return dict(self._provenance)

    # -- models on the device ---------------------------------------------------------------
    def on_device(self, device: torch.device) -> None:
        """Load the Whisper model (and diarization pipeline) on ``device``; move aligners."""
        import whisperx

        self.load()
        self._device = device
        index = device.index or 0
        self._pipeline = whisperx.load_model(
            str(self.folder),
            device.type,
            device_index=index,
            compute_type=self.compute_type,
            asr_options=self.asr_options,
            language=self.language,
            vad_method=self.vad_method,
            vad_options={**self.vad_options, "chunk_size": self.chunk_size},
            local_files_only=True,
        )
        if self.max_new_tokens is not None:
            # whisperX 3.8.6 accepts an asr option max_new_tokens but its batched decode
            # ignores it and caps at faster-whisper's max_length (448): set that cap instead.
            self._pipeline.model.max_length = self.max_new_tokens
        for language, (model, metadata) in self._aligners.items():
            self._aligners[language] = (model.to(device), metadata)
        if self.diarize:
            from whisperx.diarize import DiarizationPipeline

            try:
                self._diarizer = DiarizationPipeline(
                    model_name=self.diarize_model, token=self._token, device=device
                )
            except Exception as exc:
                raise UserError(
                    f"cannot load diarization model {self.diarize_model!r}: {exc}"
                ) from None

    def _aligner(self, language: str) -> tuple[torch.nn.Module, dict[str, Any]]:
        if language in self._aligners:
            return self._aligners[language]
        import torchaudio
        import whisperx

        name = _align_model_name(language, self.align_model)
        if name in torchaudio.pipelines.__all__:
            _check_torchaudio_bundle(name, self.align_model_dir)
        elif not Path(name).expanduser().is_dir() and hub_offline():
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(
                try_to_load_from_cache(name, "config.json", cache_dir=self.align_model_dir), str
            ):
                raise UserError(
                    f"alignment model {name!r} is not in the hub cache and there is no network "
                    f"(or HF_HUB_OFFLINE is set): download it where there is network "
                    f"(huggingface-cli download {name}), {_NO_ALIGNER}"
                )
        try:
            model, metadata = whisperx.load_align_model(
                language,
                str(self._device or "cpu"),
                model_name=name,
                model_dir=self.align_model_dir,
            )
        except Exception as exc:
            # A download that failed (urlopen error …) needs the same way out as offline.
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(
                f"cannot load alignment model {name!r} for {language!r}: {first}. Without "
                f"network access, download it first, {_NO_ALIGNER}"
            ) from None
        self._aligners[language] = (model.eval(), metadata)
        self._provenance[f"whisperx.align_model.{language}"] = name
        if Path(name).expanduser().is_dir():
            digest = weights_sha256(Path(name).expanduser())
            self._provenance[f"whisperx.align_sha256.{language}"] = digest
        return self._aligners[language]

    # -- the batch ----------------------------------------------------------------------------
    def _tokenizer(self, language: str) -> Any:
        from faster_whisper.tokenizer import Tokenizer

        if language not in self._tokenizers:
            model = self._pipeline.model
            self._tokenizers[language] = Tokenizer(
                model.hf_tokenizer,
                model.model.is_multilingual,
                task="transcribe",
                language=language,
            )
        return self._tokenizers[language]

    def _vad_chunks(self, audio: np.ndarray) -> list[dict[str, Any]]:
        """The speech chunks of one file, as ``transcribe`` finds and merges them."""
        from whisperx.vads import Pyannote, Vad

        vad = self._pipeline.vad_model
        owner = vad if isinstance(vad, Vad) else Pyannote
        found = vad({"waveform": owner.preprocess_audio(audio), "sample_rate": 16000})
        params = self._pipeline._vad_params
        return owner.merge_chunks(
            found, self.chunk_size, onset=params["vad_onset"], offset=params["vad_offset"]
        )

    def transcribe_batch(self, signals: list[np.ndarray]) -> list[Transcript]:
        """16 kHz mono signals through whisperX's steps, the chunks of all files batched."""
        import torch

        if self._pipeline is None:
            self.on_device(self._device or torch.device("cpu"))
        pipeline = self._pipeline
        chunks = [self._vad_chunks(audio) for audio in signals]
        # Detected per file, as transcribe does (a file without speech gets none).
        languages = [
            self.language or (pipeline.detect_language(audio) if found else None)
            for audio, found in zip(signals, chunks, strict=True)
        ]
        # Every chunk of every file, grouped by language (the prompt names it), in order.
        work: dict[str, list[tuple[int, int]]] = {}
        for file, found in enumerate(chunks):
            language = languages[file]
            if found:
                assert language is not None  # a file with chunks has a language
                work.setdefault(language, []).extend((file, i) for i in range(len(found)))
        decoded: dict[tuple[int, int], tuple[str, float]] = {}
        for language, keys in work.items():
            tokenizer = self._tokenizer(language)
            for begin in range(0, len(keys), self.batch_size):
                part = keys[begin : begin + self.batch_size]
                features = torch.stack(
                    [
                        pipeline.preprocess({"inputs": _cut(signals[f], chunks[f][i])})["inputs"]
                        for f, i in part
                    ]
                )
                out = pipeline.model.generate_segment_batched(features, tokenizer, pipeline.options)
                for key, text, logprob in zip(part, out["text"], out["avg_logprob"], strict=True):
                    decoded[key] = (text, logprob)
        results = []
        for file, (audio, found) in enumerate(zip(signals, chunks, strict=True)):
            segments = [
                {
                    "text": decoded[(file, i)][0],
                    "start": round(chunk["start"], 3),
                    "end": round(chunk["end"], 3),
                    "avg_logprob": decoded[(file, i)][1],
                }
                for i, chunk in enumerate(found)
            ]
            results.append(self._finish(audio, segments, languages[file]))
        return results

    def _finish(
        self, audio: np.ndarray, segments: list[dict[str, Any]], language: str | None
    ) -> Transcript:
        """Alignment and speakers for one file's decoded segments."""
        import whisperx

        result: dict[str, Any] = {"segments": segments}
        if self.align and segments and language is not None:
            ensure_punkt(language)
            model, metadata = self._aligner(language)
            result = whisperx.align(
                segments,
                model,
                metadata,
                audio,
                str(self._device or "cpu"),
                interpolate_method=self.interpolate_method,
            )
        if self._diarizer is not None and result["segments"]:
            turns = self._diarizer(
                audio, min_speakers=self.min_speakers, max_speakers=self.max_speakers
            )
            result = whisperx.assign_word_speakers(turns, result)
        return _transcript(result["segments"], language)

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> list[Transcript]:
        signals = waveforms.float().cpu().numpy()
        return self.transcribe_batch(
            [np.ascontiguousarray(signals[row, :n]) for row, n in enumerate(lengths.tolist())]
        )


def _cut(audio: np.ndarray, chunk: dict[str, Any]) -> np.ndarray:
    """A VAD chunk's samples, cut as ``transcribe`` cuts them."""
    return audio[int(chunk["start"] * 16000) : int(chunk["end"] * 16000)]


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if np.isnan(value) else value


def _transcript(raw_segments: list[dict[str, Any]], language: str | None) -> Transcript:
    segments = []
    for raw in raw_segments:
        text = str(raw.get("text", "")).strip()
        words = [
            Word(
                word=str(w.get("word", "")),
                start=_number(w.get("start")),
                end=_number(w.get("end")),
                score=_number(w.get("score")),
                speaker=w.get("speaker"),
            )
            for w in raw.get("words", [])
        ]
        if not text and not words:
            continue  # a VAD chunk in which the model heard nothing
        segments.append(
            Segment(
                text=text,
                start=float(raw["start"]),
                end=float(raw["end"]),
                speaker=raw.get("speaker"),
                avg_logprob=_number(raw.get("avg_logprob")),
                words=words,
            )
        )
    logprobs = [s.avg_logprob for s in segments if s.avg_logprob is not None]
    return Transcript(
        text=" ".join(s.text for s in segments),
        language=language,
        scores={"avg_logprob": float(np.mean(logprobs)) if logprobs else float("nan")},
        segments=segments,
    )
