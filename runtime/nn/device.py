"""The mark of arrays and weights that live on an accelerator (kept apart so that the
backends and the building blocks can both import it)."""


class OnDevice:
    """Base of arrays and weights that live on an accelerator; ``ops`` implements nn's blocks
    for them."""

    ops = None
