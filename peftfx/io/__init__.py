"""Adapters on disk. :mod:`.checkpoint` has the public ``save_adapter``/``load_adapter``; :mod:`.peftfx_format` and
:mod:`.hf` are the two formats; :mod:`.folder` writes folders atomically and reads safetensors (never pickle);
:mod:`.state` moves tensors in and out of adapter modules. This ``__init__`` imports nothing, so the lower rooms
(``multi``, ``export``) can use ``folder``/``state``/``peftfx_format`` without pulling in the whole room."""
