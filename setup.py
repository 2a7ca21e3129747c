from setuptools import find_packages, setup


def requirements(path="requirements.txt"):
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


setup(
    name="passl-lvvit",
    version="0.1.0",
    description="LV-ViT vision transformers with Token Labeling on PaddlePaddle",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["passl", "passl.*"]),
    python_requires=">=3.10",
    # paddlepaddle / paddlepaddle-gpu is not listed: pip would install the CPU build over a GPU one.
    install_requires=requirements(),
    extras_require={
        "cpu": ["paddlepaddle>=3.2"],
        "test": ["pytest>=7", "scikit-learn>=1.2"],
        "example": ["scikit-learn>=1.2"],
    },
)
