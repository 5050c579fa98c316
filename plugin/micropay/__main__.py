"""`python -m micropay`: the plugin when lightningd runs it, the `micropay` command otherwise."""
import os
import sys

if os.environ.get("LIGHTNINGD_PLUGIN") == "1":
    from .plugin.glue import main as plugin_main
    plugin_main()
else:
    from .cli import main
    sys.exit(main())
