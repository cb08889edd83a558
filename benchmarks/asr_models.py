"""Random ASR models built offline, saved the way their hubs ship them.

No pretrained weights can be downloaded here, so tests and benchmarks build the real
architectures with the libraries' own config classes: a Speech2Text model with a sentencepiece
tokenizer trained on a few sentences, a Whisper model with a byte-level BPE tokenizer converted
to CTranslate2 (what faster-whisper/whisperX load), and a ``Wav2Vec2ForCTC`` with a character
vocabulary (a whisperX alignment model). ``tiny`` sizes keep tests fast; the benchmark uses the
real sizes (s2t-small, whisper-tiny/base) so the costs are the real ones.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

#: Sentences to train the tokenizers on (Harvard sentences and pangrams, public domain).
SENTENCES = [
    "the child almost hurt the small dog",
    "drop the two when you add the figures",
    "at that high level the air is pure",
    "a thin stripe runs down the middle",
    "sunday is the best part of the week",
    "we are sure that one war is enough",
    "what joy there is in living",
    "tear a thin sheet from the yellow pad",
    "mend the coat before you go out",
    "take the winding path to reach the lake",
    "the quick brown fox jumps over the lazy dog",
    "pack my box with five dozen liquor jugs",
    "glue the sheet to the dark blue background",
    "the birch canoe slid on the smooth planks",
    "it is easy to tell the depth of a well",
    "these days a chicken leg is a rare dish",
    "rice is often served in round bowls",
    "the juice of lemons makes fine punch",
]

TINY_S2T = {"d_model": 32, "layers": 2, "heads": 2, "ffn": 64, "mel_bins": 20, "vocab": 80}
# facebook/s2t-small-librispeech-asr: 12 encoder + 6 decoder layers, d_model 256, 10k vocab.
# (The vocabulary stays as large as a few sentences allow: ~150 pieces, not 10k.)
SMALL_S2T = {
    "d_model": 256,
    "layers": 12,
    "decoder_layers": 6,
    "heads": 4,
    "ffn": 2048,
    "mel_bins": 80,
    "vocab": 1000,
}


def save_random_s2t(folder: Path, *, seed: int = 0, **size: Any) -> Path:
    """A random ``Speech2TextForConditionalGeneration`` + processor saved to ``folder``."""
    import sentencepiece as spm
    from transformers import (
        Speech2TextConfig,
        Speech2TextFeatureExtractor,
        Speech2TextForConditionalGeneration,
        Speech2TextProcessor,
        Speech2TextTokenizer,
    )

    size = {**TINY_S2T, **size}
    folder.mkdir(parents=True, exist_ok=True)
    model_proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4),
        model_writer=model_proto,
        vocab_size=min(size["vocab"], 150),
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        bos_id=-1,
        eos_id=-1,
        unk_id=0,
        minloglevel=2,
    )
    spm_file = folder / "sentencepiece.bpe.model"
    spm_file.write_bytes(model_proto.getvalue())
    processor_sp = spm.SentencePieceProcessor(model_file=str(spm_file))
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for i in range(processor_sp.get_piece_size()):
        vocab.setdefault(processor_sp.id_to_piece(i), len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Speech2TextTokenizer(
        vocab_file=str(folder / "vocab.json"), spm_file=str(spm_file), do_upper_case=False
    )
    features = Speech2TextFeatureExtractor(
        feature_size=size["mel_bins"], num_mel_bins=size["mel_bins"], sampling_rate=16000
    )
    Speech2TextProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(folder)
    config = Speech2TextConfig(
        vocab_size=len(vocab),
        d_model=size["d_model"],
        encoder_layers=size["layers"],
        decoder_layers=size.get("decoder_layers", size["layers"]),
        encoder_attention_heads=size["heads"],
        decoder_attention_heads=size["heads"],
        encoder_ffn_dim=size["ffn"],
        decoder_ffn_dim=size["ffn"],
        conv_channels=max(2 * size["d_model"], 32),
        input_feat_per_channel=size["mel_bins"],
        max_source_positions=6000,
        max_target_positions=1024,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        # Weights larger than the trained-from-scratch default make the random model's text
        # depend on its input (with the default the decoder says the same for any audio).
        init_std=size.get("init_std", 0.2),
    )
    torch.manual_seed(seed)
    model = Speech2TextForConditionalGeneration(config).eval()
    model.generation_config.max_new_tokens = 24
    model.generation_config.num_beams = 1
    model.save_pretrained(folder)
    return folder


WHISPER_LANGUAGES = ("en", "de", "fr", "es", "it")
TINY_WHISPER = {"d_model": 32, "layers": 2, "heads": 2, "ffn": 64, "vocab": 400}
# openai/whisper-base: 6 + 6 layers, d_model 512, 8 heads (the vocabulary size barely matters).
BASE_WHISPER = {"d_model": 512, "layers": 6, "heads": 8, "ffn": 2048, "vocab": 2000}


def _whisper_tokenizer(vocab: int) -> tuple[Any, list[str]]:
    """A byte-level BPE trained on :data:`SENTENCES` plus Whisper's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    special = [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *[f"<|{lang}|>" for lang in WHISPER_LANGUAGES],
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nocaptions|>",
        "<|notimestamps|>",
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([" " + s for s in SENTENCES] * 3, trainer)
    tokenizer.add_special_tokens(special)
    return tokenizer, special


def save_random_whisper_ct2(folder: Path, *, seed: int = 0, **size: Any) -> Path:
    """A random multilingual Whisper converted to CTranslate2 in ``folder`` (what
    ``whisperx.load_model`` takes as a local model), with ``tokenizer.json`` and
    ``preprocessor_config.json`` beside it so faster-whisper never reaches for the hub.

    The transformers checkpoint it was converted from stays beside it, in ``<folder>-hf``.
    """
    import ctranslate2
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    size = {**TINY_WHISPER, **size}
    hf = folder.with_name(folder.name + "-hf")
    hf.mkdir(parents=True, exist_ok=True)
    bpe, special = _whisper_tokenizer(size["vocab"])
    eot = "<|endoftext|>"
    tokenizer = WhisperTokenizerFast(
        tokenizer_object=bpe,
        unk_token=eot,
        bos_token=eot,
        eos_token=eot,
        pad_token=eot,
        additional_special_tokens=special[1:],
    )
    tokenizer.save_pretrained(hf)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(hf)  # whisperX has 80/128 filters
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in special}
    # Timestamps fill the vocabulary after the text tokens; one slot more than Whisper's 1501
    # becomes the empty-string token by which CTranslate2 recognises a multilingual model.
    config = WhisperConfig(
        vocab_size=len(tokenizer) + 1502,
        num_mel_bins=80,
        d_model=size["d_model"],
        encoder_layers=size["layers"],
        decoder_layers=size["layers"],
        encoder_attention_heads=size["heads"],
        decoder_attention_heads=size["heads"],
        encoder_ffn_dim=size["ffn"],
        decoder_ffn_dim=size["ffn"],
        max_source_positions=1500,
        max_target_positions=448,
        pad_token_id=ids[eot],
        bos_token_id=ids[eot],
        eos_token_id=ids[eot],
        decoder_start_token_id=ids["<|startoftranscript|>"],
        suppress_tokens=[],
        begin_suppress_tokens=[ids[eot]],
        init_std=size.get("init_std", 0.02),
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    # A random decoder spreads its guesses over the ~1500 timestamp and special tokens, which
    # whisperX drops from the text, and over byte pieces: zero every embedding (tied to the
    # output layer) but those of whole words ("Ġword") and the end of text, so the random
    # transcripts are words that an aligner can place.
    with torch.no_grad():
        for token, index in tokenizer.get_vocab().items():
            if index != ids[eot] and not (token.startswith("Ġ") and token[1:].isalpha()):
                model.model.decoder.embed_tokens.weight[index] = 0.0
        model.model.decoder.embed_tokens.weight[len(tokenizer) :] = 0.0
    generation = model.generation_config
    generation.lang_to_id = {f"<|{lang}|>": ids[f"<|{lang}|>"] for lang in WHISPER_LANGUAGES}
    generation.suppress_tokens = []
    generation.begin_suppress_tokens = [ids[eot]]
    model.save_pretrained(hf)
    converter = ctranslate2.converters.TransformersConverter(
        str(hf), copy_files=["tokenizer.json", "preprocessor_config.json"]
    )
    converter.convert(str(folder), force=True)
    vocabulary_file = folder / "vocabulary.json"
    vocabulary = json.loads(vocabulary_file.read_text())
    vocabulary[-1] = ""
    vocabulary_file.write_text(json.dumps(vocabulary))
    return folder


TINY_CTC = {"d_model": 32, "layers": 2, "heads": 2, "ffn": 37}


def save_random_ctc_aligner(folder: Path, *, seed: int = 0, **size: Any) -> Path:
    """A random ``Wav2Vec2ForCTC`` with a character vocabulary (``|`` = word boundary), saved
    with its processor: a whisperX alignment model (``align_model`` = this folder)."""
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    size = {**TINY_CTC, **size}
    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz'"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4}
    vocab.update({c: 5 + i for i, c in enumerate(letters)})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), word_delimiter_token="|")
    features = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True
    )
    Wav2Vec2Processor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(folder)
    config = Wav2Vec2Config(
        vocab_size=len(vocab),
        hidden_size=size["d_model"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        intermediate_size=size["ffn"],
        conv_dim=(size.get("conv", 32),) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    Wav2Vec2ForCTC(config).eval().save_pretrained(folder)
    return folder
