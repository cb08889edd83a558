"""Signal-level feature extractors: openSMILE, librosa, torchaudio Kaldi filterbanks."""
