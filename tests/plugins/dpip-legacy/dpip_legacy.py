"""A plugin from before dpip.filters: it imports common.filters, which still works for a release."""

from PIL import ImageOps

from common.filters import Param, define, eight_bit


@define("posterize", "fewer colour levels", Param("bits", int, 4, 1, 8, "bits per band"))
def posterize(im, params):
    return ImageOps.posterize(eight_bit(im).convert("RGB"), params["bits"])
