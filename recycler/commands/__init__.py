"""The `recycler` subcommands, one module each: its flags (`add_arguments`, where argparse
checks them) and what it does with them (`run`), printing for a person. The library
below raises errors that name study or recipe keys; only these modules name flags.
"""
