#!/usr/bin/env python3
"""The plugin's entry point for CLN's plugin manager (`reckless install`), which looks
for <name>.py and a requirements.txt in a directory named after the plugin. Installed
with pip, the `micropay-plugin` command is the same thing.

reckless copies this directory alone and runs this file with it on sys.path, so the
package is imported from the directory above it, where the copy keeps it.
"""
import sys
from pathlib import Path

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here.parent))            # the directory that holds the micropay package
    if str(here) in sys.path[1:]:
        sys.path.remove(str(here))                  # this file is not the package
    from micropay.plugin.glue import main
    main()
