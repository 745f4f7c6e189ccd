"""Dense heads on exported backbones: ViTDet's windowed ViT + simple feature pyramid (`vitdet`), torchvision Mask
R-CNN on that pyramid (`maskrcnn`) and a Mask2Former adapter onto transformers (`mask2former`)."""
