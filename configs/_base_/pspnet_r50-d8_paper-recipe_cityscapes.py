# PSPNet R-50-D8 on Cityscapes with the RepVGG paper's segmentation recipe, so the
# RepVGG and ResNet rows are trained the same way. Differences from mmseg's 40k schedule:
# batch 16 (8 GPUs x 2) instead of 8, weight decay 1e-4 instead of 5e-4, poly decay to 0
# instead of 1e-4, and 40 epochs = ceil(40 * 2975 / 16) = 7438 iterations instead of 40k.
_base_ = 'mmseg::pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py'
custom_imports = dict(imports=['mmrepvgg'], allow_failed_imports=False)

epochs, images, batch = 40, 2975, 16
max_iters = -(-epochs * images // batch)  # ceil(7437.5) = 7438
epoch_iters = -(-images // batch)  # 186

train_dataloader = dict(batch_size=2)  # per GPU: 8 GPUs x 2 = 16
# the batch the recipe's learning rate is for (tools/reproduce.py --scale-lr scales it)
auto_scale_lr = dict(enable=False, base_batch_size=batch)
optim_wrapper = dict(optimizer=dict(lr=0.01, momentum=0.9, weight_decay=1e-4))
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=max_iters,
                        by_epoch=False)]
train_cfg = dict(max_iters=max_iters, val_interval=4 * epoch_iters)
default_hooks = dict(checkpoint=dict(interval=4 * epoch_iters, max_keep_ckpts=2))
