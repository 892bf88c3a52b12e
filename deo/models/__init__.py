"""Student (Swin, per-modality patch embeddings), frozen DINOv3 teacher, EMA teacher and heads."""

from deo.models.dinov3 import DINOv3Teacher, build_teacher
from deo.models.ema import EMATeacher
from deo.models.heads import MLPHead
from deo.models.student import DEOStudent, build_student

__all__ = ["DEOStudent", "DINOv3Teacher", "EMATeacher", "MLPHead", "build_student", "build_teacher"]
