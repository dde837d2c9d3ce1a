"""The model: loading an encoder, naming its parameters, applying a selection to it (masked or sparse layers), and its forward pass and loss."""
