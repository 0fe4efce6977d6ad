"""Data: a corpus to token ids on disk and random training windows (`corpus`), and tokenizers (`tokenizer`)."""
