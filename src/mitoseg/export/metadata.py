"""What a BioImage Model Zoo package says about its model: the metadata schemas.

The people, citations, training data and descriptive fields of ``rdf.yaml``
(:class:`ExportMetadata`) and what an export wrote (:class:`ExportReport`), as pydantic
models; :mod:`mitoseg.export.bioimageio` builds the package from them. Imports nothing
heavy.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "UNET_CITATION",
    "VNC_TRAINING_DATA",
    "Citation",
    "ExportMetadata",
    "ExportReport",
    "Person",
    "TrainingData",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Person(_Strict):
    """An author of the model or of the training data."""

    name: str = Field(min_length=1)
    affiliation: str | None = None
    email: str | None = None
    github_user: str | None = None
    orcid: str | None = None


class Citation(_Strict):
    """A reference to cite: ``text`` and a DOI or URL."""

    text: str = Field(min_length=1)
    doi: str | None = None
    url: str | None = None


class TrainingData(_Strict):
    """What the model was trained on (an inline bioimage.io dataset description)."""

    name: str = Field(min_length=1)
    description: str = Field(min_length=1)
    source: str | None = None
    license: str = Field(min_length=1, description="SPDX identifier")
    cite: list[Citation] = Field(min_length=1)
    authors: list[Person] = Field(default_factory=list)


#: The U-Net paper: the architecture every mitoseg model uses.
UNET_CITATION = Citation(
    text="Ronneberger O, Fischer P, Brox T (2015). U-Net: Convolutional Networks for "
    "Biomedical Image Segmentation. MICCAI 2015.",
    doi="10.1007/978-3-319-24574-4_28",
)

#: The bundled sample's source: the default training data description.
VNC_TRAINING_DATA = TrainingData(
    name="Segmented anisotropic ssTEM dataset of neural tissue (Drosophila larval VNC)",
    description="Serial-section TEM of the Drosophila first instar larva ventral nerve cord, "
    "4.6 x 4.6 nm pixels, 45-50 nm sections, with mitochondria masks; mitoseg trains on "
    "whole slices split into training and validation slices.",
    source="https://doi.org/10.6084/m9.figshare.856713",
    license="CC-BY-NC-SA-3.0",
    cite=[
        Citation(
            text="Gerhard S, Funke J, Martel J, Cardona A, Fetter R (2013). Segmented "
            "anisotropic ssTEM dataset of neural tissue. figshare.",
            doi="10.6084/m9.figshare.856713",
        )
    ],
    authors=[
        Person(name="Stephan Gerhard"),
        Person(name="Jan Funke"),
        Person(name="Julien Martel"),
        Person(name="Albert Cardona"),
        Person(name="Richard Fetter"),
    ],
)


class ExportMetadata(_Strict):
    """Who made the model and how it may be used; everything in ``rdf.yaml`` that the
    network and its plan cannot tell."""

    name: str = Field("mitoseg UNet mitochondria segmentation (EM)", min_length=5, max_length=128)
    description: str = Field(
        "2D UNet that segments mitochondria in electron microscopy slices; outputs the "
        "per-pixel foreground probability.",
        min_length=1,
        max_length=1024,
    )
    authors: list[Person] = Field(
        default_factory=lambda: [Person(name="mitoseg contributors")], min_length=1
    )
    cite: list[Citation] = Field(default_factory=lambda: [UNET_CITATION], min_length=1)
    license: str | None = Field(
        None,
        min_length=1,
        description="SPDX identifier of the weights; None: the training data's licence "
        "(weights trained on share-alike data are shared alike)",
    )
    tags: list[str] = Field(
        default_factory=lambda: [
            "electron-microscopy",
            "mitochondria",
            "semantic-segmentation",
            "unet",
            "2d",
            "keras",
            "mitoseg",
        ]
    )
    training_data: TrainingData = VNC_TRAINING_DATA
    git_repo: str | None = None
    version: str | None = None

    @property
    def weights_license(self) -> str:
        """The licence written into the package: ``license``, else the training data's."""
        return self.license or self.training_data.license


class ExportReport(_Strict):
    """What :func:`export_bioimageio` wrote (returned, and printed by the CLI).

    Attributes:
        path: the package folder or ``.zip``.
        weight_formats: weight entries in the package, the original first.
        test_input_shape: ``(1, H, W, C_in)`` of ``test_input.npy`` (float32 raw
            intensities, before the package's preprocessing).
        test_output_shape: ``(1, H, W, C_out)`` of ``test_output.npy`` (float32 in [0, 1]).
        voxel_size_nm: ``(y, x)`` pixel size written as the axes' scale (nanometre).
        threshold: the plan's threshold (not applied inside the package), or None.
        source_slice: index of the sample slice the test tensors come from.
    """

    path: str
    weight_formats: list[str]
    test_input_shape: list[int]
    test_output_shape: list[int]
    voxel_size_nm: list[float]
    threshold: float | None
    source_slice: int
