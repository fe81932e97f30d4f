# SPDX-License-Identifier: Apache-2.0
"""The wire protocol's version, alone so that both ``kvbridge.protocol`` (the
messages) and ``kvbridge.layout`` (the descriptor inside the handshake) can
import it without importing each other. The changelog is in
``kvbridge.protocol``'s docstring: bump this on any change to the wire
messages or to the meaning of a layout field."""

PROTOCOL_VERSION = 3
