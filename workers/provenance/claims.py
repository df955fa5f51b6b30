"""The facts every diffusion output states, whether or not it is signed.

The EU AI Act (Art. 50(2)) asks that generated images be marked as such in a
machine-readable form: the IPTC digital source type says it, in XMP for readers that
know no C2PA and in the signed C2PA manifest's action for those that do.
"""

from __future__ import annotations

from enum import Enum

IPTC_SOURCE_TYPES = "http://cv.iptc.org/newscodes/digitalsourcetype/"
#: The PNG iTXt keyword XMP lives under (XMP spec part 3, §1.1.5).
XMP_KEY = "XML:com.adobe.xmp"


class Origin(Enum):
    """How an output came to be: its C2PA action."""

    #: generate: made from a prompt alone.
    CREATED = "c2pa.created"
    #: inpaint and style: an input image changed by the model.
    EDITED = "c2pa.edited"

    @property
    def source_type(self) -> str:
        """The IPTC digital source type of such an output."""
        if self is Origin.CREATED:
            return IPTC_SOURCE_TYPES + "trainedAlgorithmicMedia"
        return IPTC_SOURCE_TYPES + "compositeWithTrainedAlgorithmicMedia"


def xmp_packet(origin: Origin) -> str:
    """An XMP packet with ``Iptc4xmpExt:DigitalSourceType`` and nothing else: no dates or
    ids, so equal pixels and parameters still give equal PNG bytes."""
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" '
        'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
        f'Iptc4xmpExt:DigitalSourceType="{origin.source_type}"/>'
        "</rdf:RDF></x:xmpmeta>"
        '<?xpacket end="r"?>'
    )


def read_source_type(xmp: str) -> str | None:
    """The digital source type an XMP packet states (as ``xmp_packet`` writes it)."""
    marker = 'Iptc4xmpExt:DigitalSourceType="'
    start = xmp.find(marker)
    if start < 0:
        return None
    start += len(marker)
    end = xmp.find('"', start)
    return xmp[start:end] if end > start else None
