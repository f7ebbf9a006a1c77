"""Object detection on the visionmlp backbones: torchvision's RetinaNet, Faster R-CNN and Mask R-CNN with an FPN,
COCO data and evaluation, and ``visionmlp detect train | eval | predict``."""
