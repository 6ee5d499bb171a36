"""Pure-numpy codecs: quantizers, bit packing, chunking, and the exact cost in bits.

No protobuf, gRPC or TensorFlow here: the transport converts TensorChunk to and from the wire in
flq/serde.py, and everything else sees only these types.
"""

from flq.codec.bitpack import pack_bits, packed_size, unpack_bits
from flq.codec.chunks import MAX_CHUNK_BYTES, Reassembler, TensorChunk, group_chunks, split_tensors
from flq.codec.errors import CodecError
from flq.codec.quantizers import (
    encode_block_grid,
    encode_float16,
    encode_float32,
    encode_laq_grid,
    encode_sign,
    encode_stochastic,
)
from flq.codec.registry import SPECS, CodecSpec, decode, encode, payload_bytes, validate
from flq.codec.tensor import HEADER_FIXED_BITS, Codec, EncodedTensor, header_bits

__all__ = [
    "HEADER_FIXED_BITS",
    "MAX_CHUNK_BYTES",
    "SPECS",
    "Codec",
    "CodecError",
    "CodecSpec",
    "EncodedTensor",
    "Reassembler",
    "TensorChunk",
    "decode",
    "encode",
    "encode_block_grid",
    "encode_float16",
    "encode_float32",
    "encode_laq_grid",
    "encode_sign",
    "encode_stochastic",
    "group_chunks",
    "header_bits",
    "pack_bits",
    "packed_size",
    "payload_bytes",
    "split_tensors",
    "unpack_bits",
    "validate",
]
