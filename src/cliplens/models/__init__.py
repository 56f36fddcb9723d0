"""The encoders: the `Encoder` protocol (encoder.py), the PyTorch backends behind it
(torch_encoder.py, openclip.py, offline.py), `ModelRef` (ref.py), names and what they load
(registry.py, zoo.py), and torch-free text towers (onnx_text.py). The public names are
`cliplens.load_model`, `cliplens.ModelRef`, `cliplens.Encoder` and their neighbours."""
