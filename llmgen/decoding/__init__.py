"""Decoding strategies. Each returns results plus a trace; none of them prints."""
