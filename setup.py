from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec(Path("sgcl/__init__.py").read_text(), version)

setup(
    name="sgcl",
    version=version["__version__"],
    description="Self-supervised pretraining toolkit for whole-slide pathology images (SGCL)",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sgcl*", "preprocessing*", "evaluation*"]),
    include_package_data=True,
    install_requires=[
        # torch and torchvision are installed first (see README); timm pulls torchvision.
        "torch>=2.1",
        "torchvision",
        "timm>=1.0",
        "numpy",
        "h5py>=3.8",
        "openslide-python>=1.3",
        "openslide-bin",
        "tifffile",
        "imagecodecs",
        "pillow",
        "opencv-python-headless",
        "scikit-image",
        "pandas",
        "pyyaml",
        "tqdm",
        "safetensors",
        "faiss-cpu",
        "scikit-learn",
        "matplotlib",
        "albumentations",
        "tensorboard",
        "psutil",
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "shapely>=2.0"],  # shapely: tests only (GeoJSON and heatmap top-k geometry checks)
        # TIAToolbox pins an older torch: install it in its own environment (see docs/install.md).
        "tia": ["tiatoolbox"],
    },
    entry_points={"console_scripts": ["sgcl=sgcl.cli:main"]},
)
