"""The selling side, without HTTP: the config file (config.py, configfile.py,
config_check.py, tomlpos.py), route prices (pricing.py), challenges (challenger.py),
settlement (settlement.py) and discovery of priced routes (discovery.py)."""
