"""The contract both sides must agree on: wire format, codecs, topics, message builders,
the error decoders raise. Nothing here is device- or hub-specific."""
