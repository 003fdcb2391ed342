"""Pixels: decoding and fitting images to the encoder geometry (decode, prepare), the exact Pillow
resampling in torch (resample), the torch image path of the encoder actor (device), composing
losers (compose) and encoding the stored images (codec). Torch-free to import: only resample and
device load torch."""
