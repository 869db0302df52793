"""Write the phantom DICOM files shipped in examples/ (seed 2026, 384 px, the demo model's size).

python examples/make_examples.py
"""

from pathlib import Path

from llama3med.data.phantoms import describe, make_phantom, save_phantom_dicom

EXAMPLES = {"phantom_ct_lesion.dcm": 11, "phantom_mr_normal.dcm": 4}  # index in the seed-2026 sequence

if __name__ == "__main__":
    for name, index in EXAMPLES.items():
        phantom = make_phantom(seed=2026, index=index, size=384)
        save_phantom_dicom(phantom, Path(__file__).parent / name)
        print(f"{name}: {describe(phantom)}")
