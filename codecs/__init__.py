"""Every wire message of the gateway as a msgspec Struct, with its encoders and decoders.

Installed as ``gateway_codecs`` (the standard library owns the name ``codecs``).
"""
