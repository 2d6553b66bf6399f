"""Publishing runs on the Hugging Face hub.

card        the model card (README.md) built from a run directory
transfer    push / pull with huggingface_hub, hub errors -> one-line HubError
verify      push publishes only a checked run (a passed eval of this checkpoint, a clean scale audit)
"""
