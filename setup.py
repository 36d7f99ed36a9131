from setuptools import find_packages, setup

setup(
    name="sharded-novograd",
    version="0.1.0",
    description="Exact NovoGrad under ZeRO-style sharding for PyTorch (torchrun, DeepSpeed, mpirun)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["sharded_novograd", "sharded_novograd.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4,<3"],
    extras_require={
        "deepspeed": ["deepspeed>=0.19.8,<0.20"],
        "triton": ["triton>=3.0"],
        "mpi": ["mpi4py>=3.1"],
        "launch": ["tqdm>=4.60", "matplotlib>=3.5", "tomli>=2.0; python_version<'3.11'"],
        # The training stacks the integration tests run for real (models built from configs).
        "stacks": ["transformers>=5.0,<6", "accelerate>=1.10,<2", "lightning>=2.5,<3"],
        "dev": ["pytest>=7", "tqdm>=4.60", "matplotlib>=3.5", "tomli>=2.0; python_version<'3.11'"],
    },
    license="Apache-2.0",
)
