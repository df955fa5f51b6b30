"""What a diffusion output says about itself: the IPTC digital source type in XMP on
every output (``claims``), a signed C2PA manifest where a certificate is configured
(``signing``), reading one back (``verify``), a development chain (``devchain``) and the
``imageq provenance`` / ``imageq verify`` commands (``cli``). docs/design.md §Provenance."""
