"""The training flow: data -> corrupt -> model -> losses -> engine (one resumable, distributed job skeleton),
with the two jobs built on it, pretraining and fine-tuning."""
