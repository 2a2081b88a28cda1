"""A merge as a Hugging Face model directory: the directory's assembly (`model_dir`) and
its model card (`card`)."""
