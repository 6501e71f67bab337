"""The recipes: one file per recipe, each with `get_config() -> ml_collections.ConfigDict`.

`segjax train --config NAME` loads `segjax/configs/NAME.py` (see segjax/config.py); this package makes
setuptools ship them in the wheel.
"""
