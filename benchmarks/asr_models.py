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
