"""The image formats training accepts, by PIL's format names: the one list.

``trainer.data.images.decode_image`` refuses anything else, naming this list, and the HTTP server's
default ``allowed_formats`` is this list (so a file training accepts is never a 415). It lives in
its own module, outside ``trainer.data``, so that the server's config imports it without torch.
MPO is the JPEG with an MPF secondary image that phone and stereo cameras write: its first frame is
decoded, as by the C++ runtime.
"""
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "WEBP", "GIF", "TIFF")
