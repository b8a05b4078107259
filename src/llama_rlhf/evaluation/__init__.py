"""Answer extraction and scoring for math word problems."""
