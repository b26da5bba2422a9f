"""Foreign checkpoints: recognise a state dict saved by another project's code and rename it onto a robustkd
architecture that computes the same function (see ``formats`` for the formats, ``recognise`` for the rules)."""

from robustkd.models.foreign.formats import FORMATS, Format
from robustkd.models.foreign.recognise import NORMALISATION_KEYS, Recognised, formats_of, list_formats, recognise

__all__ = ["FORMATS", "NORMALISATION_KEYS", "Format", "Recognised", "formats_of", "list_formats", "recognise"]
