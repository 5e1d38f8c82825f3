from setuptools import find_packages, setup

setup(
    name="influence-tf2",
    version="0.1.0",
    description="Influence functions (Koh & Liang, ICML 2017) in TensorFlow 2 / Keras 3, with the paper's experiments",
    packages=find_packages(include=["influence", "influence.*", "inception", "inception.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow-cpu>=2.21; platform_machine!='arm64'",
        "keras>=3.15",
        "numpy>=2",
        "scipy>=1.11",
        "scikit-learn>=1.4",
        "joblib>=1.3",
        "cloudpickle>=2.2",
        "matplotlib>=3.8",
        "tqdm>=4.60",
    ],
    extras_require={"dask": ["dask[distributed]"], "test": ["pytest"]},
)
