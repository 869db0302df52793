"""Write the phantom files shipped in examples/ (seed 2026, 384 px, the demo model's size): DICOM, and the
CT slice as NIfTI too, as dcm2niix would convert it.

python examples/make_examples.py
"""

from pathlib import Path

from llama3med.data.phantoms import describe, make_phantom, save_phantom_dicom, save_phantom_nifti

EXAMPLES = {"phantom_ct_lesion.dcm": 11, "phantom_mr_normal.dcm": 4, "phantom_ct_lesion.nii.gz": 11}  # seed-2026 index

if __name__ == "__main__":
    for name, index in EXAMPLES.items():
        phantom = make_phantom(seed=2026, index=index, size=384)
        save = save_phantom_nifti if name.endswith(".nii.gz") else save_phantom_dicom
        save(phantom, Path(__file__).parent / name)
        print(f"{name}: {describe(phantom)}")
