"""The Lightning side: device spec, predict module, Parquet writer, progress bar."""
