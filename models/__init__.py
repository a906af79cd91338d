"""Model construction from parsed flags: ``build_model(args) -> (model, criterion, postprocessors)``."""
from .research_settings import reads_decoder_queries
from .stages import parse_stages

from .backbone import build_backbone
from .deformable_detr import DeformableDETR
from .deformable_transformer import DeformableTransformer
from .denoising import DenoisingConfig
from .weights import load_pretrained, read_state_dict

__all__ = ["build_model", "build_transformer", "load_pretrained", "read_state_dict"]


def build_transformer(args) -> DeformableTransformer:
    generator = None
    if args.enc_ref_mode != "none":
        from .enc_reference import build_enc_reference_generator
        generator = build_enc_reference_generator(args)
    return DeformableTransformer(
        d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
        num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward, dropout=args.dropout,
        num_feature_levels=args.num_feature_levels, dec_n_points=args.dec_n_points, enc_n_points=args.enc_n_points,
        two_stage=args.two_stage, with_box_refine=args.with_box_refine, look_forward_twice=args.look_forward_twice,
        mixed_selection=args.mixed_selection, use_ms_detr=args.use_ms_detr, use_aux_ffn=args.use_aux_ffn,
        stages=parse_stages(args.stages or f"{args.enc_layers}:{args.dec_layers}", args.enc_layers, args.dec_layers),
        enc_ref_progressive=args.enc_ref_progressive, enc_reference_generator=generator)


def guidance_reads_one2many_at_eval(args) -> bool:
    """Whether inference must run the one-to-many queries / stream for the encoder guidance (docs/design.md §6)."""
    has_one2many = args.num_queries_one2many > 0 or args.use_ms_detr
    return (args.enc_ref_mode != "none" and args.ref_queries == "all" and args.ref_eval_one2many
            and has_one2many and reads_decoder_queries(args.ref_source, args.ref_rank))


def build_denoising_config(args):
    """DINO's CDN settings with --use_dn, else None."""
    if not args.use_dn:
        return None
    return DenoisingConfig(num_classes=args.num_classes, dn_number=args.dn_number,
                           label_noise_ratio=args.dn_label_noise_ratio, box_noise_scale=args.dn_box_noise_scale)


def build_model(args):
    """Parsed flags (``cli.config.parse_args``) -> (model, criterion, postprocessors).

    ``args.num_classes`` must be set (main.py derives it from the dataset when unset).
    """
    from .criterion import build_criterion
    from .postprocess import build_postprocessors

    if args.num_classes is None:
        raise ValueError("build_model: args.num_classes is not set (91 for COCO; datasets.num_classes(args))")
    model = DeformableDETR(
        build_backbone(args), build_transformer(args), num_classes=args.num_classes,
        num_feature_levels=args.num_feature_levels, num_queries_one2one=args.num_queries_one2one,
        num_queries_one2many=args.num_queries_one2many, aux_loss=args.aux_loss,
        with_box_refine=args.with_box_refine, two_stage=args.two_stage, mixed_selection=args.mixed_selection,
        use_ms_detr=args.use_ms_detr, one2many_at_eval=guidance_reads_one2many_at_eval(args),
        denoising=build_denoising_config(args))
    return model, build_criterion(args, args.num_classes), build_postprocessors(args)
