"""Procedures above the parts: runs that load data and train or fit a part on their own (a tokenizer fit), which
the methods' `prepare` and the commands start. They sit beside the methods and may use every layer below."""
