;; One step of torch.optim.ASGD's _single_tensor_asgd (torch/optim/asgd.py) on float32 tensors, with the
;; hardware fused multiply-add of WebAssembly relaxed SIMD (f32x4.relaxed_madd). Built by
;; scripts/build-wasm.ts, like asgd.wat, whose exact emulation it replaces where it may.
;;
;; relaxed_madd(a, b, c) is a*b + c rounded once OR twice, as the engine and CPU choose: V8 emits
;; vfmadd on x86 with FMA3 and fmla on ARM64 (one rounding, PyTorch's vec::fmadd), but a mul and an add
;; on CPUs without FMA. So this module is only used after src/optim/fma-self-test.ts has proven on this
;; machine that it computes exactly what the emulating kernel (and so PyTorch) computes.
;;
;; Per element (the scalars are prepared by src/optim/wasm/index.ts from the float32 state):
;;   g  = maximize ? -grad : grad
;;   g  = fma(param, wd, g)                 if weight decay   (grad.add(param, alpha=wd))
;;   p  = fma(g, -eta, param * decay)                         (param.mul_(...); param.add_(grad, alpha=-eta))
;;   ax = ax + ((p - ax) * mu)              if averaging, else ax = p
;; One pass over memory: each element's param, grad and ax are read once and param, ax written once.
;; Four loops, one per configuration (weight decay, averaging): a branch inside costs V8 speed.
;; Eight elements per iteration; the last n % 8 go through a zero-padded scratch area at address 0.
;;
;; Flags: 1 weight decay, 2 averaging (mu != 1), 4 maximize. (The unfused mode, ATEN_CPU_CAPABILITY=
;; default, is asgd.wat's: the wrapper sends such steps there.)
(module
  (import "env" "memory" (memory 1))

  ;; scratch for the tail: param at 0, grad at 32, ax at 64
  (global $TAIL_P i32 (i32.const 0))
  (global $TAIL_G i32 (i32.const 32))
  (global $TAIL_A i32 (i32.const 64))

  ;; no weight decay, ax = param (maximize: the multiplier is +eta)
  (func $nowd_copy (param $end i32) (param $pp i32) (param $gp i32) (param $ap i32)
      (param $decay v128) (param $mult v128) (param $wd v128) (param $mu v128) (param $sign v128)
    (local $i i32) (local $p0 v128) (local $g0 v128) (local $a0 v128) (local $p1 v128) (local $g1 v128) (local $a1 v128)
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (local.get $end)))
      (local.set $p0 (v128.load (i32.add (local.get $pp) (local.get $i))))
      (local.set $g0 (v128.load (i32.add (local.get $gp) (local.get $i))))
      (local.set $p0 (f32x4.relaxed_madd (local.get $g0) (local.get $mult) (f32x4.mul (local.get $p0) (local.get $decay))))
      (v128.store (i32.add (local.get $pp) (local.get $i)) (local.get $p0))
      (v128.store (i32.add (local.get $ap) (local.get $i)) (local.get $p0))
      (local.set $p1 (v128.load offset=16 (i32.add (local.get $pp) (local.get $i))))
      (local.set $g1 (v128.load offset=16 (i32.add (local.get $gp) (local.get $i))))
      (local.set $p1 (f32x4.relaxed_madd (local.get $g1) (local.get $mult) (f32x4.mul (local.get $p1) (local.get $decay))))
      (v128.store offset=16 (i32.add (local.get $pp) (local.get $i)) (local.get $p1))
      (v128.store offset=16 (i32.add (local.get $ap) (local.get $i)) (local.get $p1))
      (local.set $i (i32.add (local.get $i) (i32.const 32)))
      (br $next)))
    )

  ;; no weight decay, averaging
  (func $nowd_avg (param $end i32) (param $pp i32) (param $gp i32) (param $ap i32)
      (param $decay v128) (param $mult v128) (param $wd v128) (param $mu v128) (param $sign v128)
    (local $i i32) (local $p0 v128) (local $g0 v128) (local $a0 v128) (local $p1 v128) (local $g1 v128) (local $a1 v128)
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (local.get $end)))
      (local.set $p0 (v128.load (i32.add (local.get $pp) (local.get $i))))
      (local.set $g0 (v128.load (i32.add (local.get $gp) (local.get $i))))
      (local.set $p0 (f32x4.relaxed_madd (local.get $g0) (local.get $mult) (f32x4.mul (local.get $p0) (local.get $decay))))
      (v128.store (i32.add (local.get $pp) (local.get $i)) (local.get $p0))
      (local.set $a0 (v128.load (i32.add (local.get $ap) (local.get $i))))
      (v128.store (i32.add (local.get $ap) (local.get $i))
        (f32x4.add (local.get $a0) (f32x4.mul (f32x4.sub (local.get $p0) (local.get $a0)) (local.get $mu))))
      (local.set $p1 (v128.load offset=16 (i32.add (local.get $pp) (local.get $i))))
      (local.set $g1 (v128.load offset=16 (i32.add (local.get $gp) (local.get $i))))
      (local.set $p1 (f32x4.relaxed_madd (local.get $g1) (local.get $mult) (f32x4.mul (local.get $p1) (local.get $decay))))
      (v128.store offset=16 (i32.add (local.get $pp) (local.get $i)) (local.get $p1))
      (local.set $a1 (v128.load offset=16 (i32.add (local.get $ap) (local.get $i))))
      (v128.store offset=16 (i32.add (local.get $ap) (local.get $i))
        (f32x4.add (local.get $a1) (f32x4.mul (f32x4.sub (local.get $p1) (local.get $a1)) (local.get $mu))))
      (local.set $i (i32.add (local.get $i) (i32.const 32)))
      (br $next)))
    )

  ;; weight decay (maximize: the gradient's sign flipped first), ax = param
  (func $wd_copy (param $end i32) (param $pp i32) (param $gp i32) (param $ap i32)
      (param $decay v128) (param $mult v128) (param $wd v128) (param $mu v128) (param $sign v128)
    (local $i i32) (local $p0 v128) (local $g0 v128) (local $a0 v128) (local $p1 v128) (local $g1 v128) (local $a1 v128)
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (local.get $end)))
      (local.set $p0 (v128.load (i32.add (local.get $pp) (local.get $i))))
      (local.set $g0 (f32x4.relaxed_madd (local.get $p0) (local.get $wd)
        (v128.xor (v128.load (i32.add (local.get $gp) (local.get $i))) (local.get $sign))))
      (local.set $p0 (f32x4.relaxed_madd (local.get $g0) (local.get $mult) (f32x4.mul (local.get $p0) (local.get $decay))))
      (v128.store (i32.add (local.get $pp) (local.get $i)) (local.get $p0))
      (v128.store (i32.add (local.get $ap) (local.get $i)) (local.get $p0))
      (local.set $p1 (v128.load offset=16 (i32.add (local.get $pp) (local.get $i))))
      (local.set $g1 (f32x4.relaxed_madd (local.get $p1) (local.get $wd)
        (v128.xor (v128.load offset=16 (i32.add (local.get $gp) (local.get $i))) (local.get $sign))))
      (local.set $p1 (f32x4.relaxed_madd (local.get $g1) (local.get $mult) (f32x4.mul (local.get $p1) (local.get $decay))))
      (v128.store offset=16 (i32.add (local.get $pp) (local.get $i)) (local.get $p1))
      (v128.store offset=16 (i32.add (local.get $ap) (local.get $i)) (local.get $p1))
      (local.set $i (i32.add (local.get $i) (i32.const 32)))
      (br $next)))
    )

  ;; weight decay, averaging
  (func $wd_avg (param $end i32) (param $pp i32) (param $gp i32) (param $ap i32)
      (param $decay v128) (param $mult v128) (param $wd v128) (param $mu v128) (param $sign v128)
    (local $i i32) (local $p0 v128) (local $g0 v128) (local $a0 v128) (local $p1 v128) (local $g1 v128) (local $a1 v128)
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (local.get $end)))
      (local.set $p0 (v128.load (i32.add (local.get $pp) (local.get $i))))
      (local.set $g0 (f32x4.relaxed_madd (local.get $p0) (local.get $wd)
        (v128.xor (v128.load (i32.add (local.get $gp) (local.get $i))) (local.get $sign))))
      (local.set $p0 (f32x4.relaxed_madd (local.get $g0) (local.get $mult) (f32x4.mul (local.get $p0) (local.get $decay))))
      (v128.store (i32.add (local.get $pp) (local.get $i)) (local.get $p0))
      (local.set $a0 (v128.load (i32.add (local.get $ap) (local.get $i))))
      (v128.store (i32.add (local.get $ap) (local.get $i))
        (f32x4.add (local.get $a0) (f32x4.mul (f32x4.sub (local.get $p0) (local.get $a0)) (local.get $mu))))
      (local.set $p1 (v128.load offset=16 (i32.add (local.get $pp) (local.get $i))))
      (local.set $g1 (f32x4.relaxed_madd (local.get $p1) (local.get $wd)
        (v128.xor (v128.load offset=16 (i32.add (local.get $gp) (local.get $i))) (local.get $sign))))
      (local.set $p1 (f32x4.relaxed_madd (local.get $g1) (local.get $mult) (f32x4.mul (local.get $p1) (local.get $decay))))
      (v128.store offset=16 (i32.add (local.get $pp) (local.get $i)) (local.get $p1))
      (local.set $a1 (v128.load offset=16 (i32.add (local.get $ap) (local.get $i))))
      (v128.store offset=16 (i32.add (local.get $ap) (local.get $i))
        (f32x4.add (local.get $a1) (f32x4.mul (f32x4.sub (local.get $p1) (local.get $a1)) (local.get $mu))))
      (local.set $i (i32.add (local.get $i) (i32.const 32)))
      (br $next)))
    )


  ;; the loop for these flags, over [0, end) bytes of each tensor (end a multiple of 32)
  (func $run (param $end i32) (param $pp i32) (param $gp i32) (param $ap i32)
      (param $decay v128) (param $mult v128) (param $wd v128) (param $mu v128) (param $sign v128) (param $flags i32)
    (if (i32.and (local.get $flags) (i32.const 1))
      (then
        (if (i32.and (local.get $flags) (i32.const 2))
          (then (call $wd_avg (local.get $end) (local.get $pp) (local.get $gp) (local.get $ap)
            (local.get $decay) (local.get $mult) (local.get $wd) (local.get $mu) (local.get $sign)))
          (else (call $wd_copy (local.get $end) (local.get $pp) (local.get $gp) (local.get $ap)
            (local.get $decay) (local.get $mult) (local.get $wd) (local.get $mu) (local.get $sign)))))
      (else
        (if (i32.and (local.get $flags) (i32.const 2))
          (then (call $nowd_avg (local.get $end) (local.get $pp) (local.get $gp) (local.get $ap)
            (local.get $decay) (local.get $mult) (local.get $wd) (local.get $mu) (local.get $sign)))
          (else (call $nowd_copy (local.get $end) (local.get $pp) (local.get $gp) (local.get $ap)
            (local.get $decay) (local.get $mult) (local.get $wd) (local.get $mu) (local.get $sign)))))))

  ;; ---------------------------------------------------------------- the step
  (func (export "step") (param $n i32) (param $pp i32) (param $gp i32) (param $ap i32)
      (param $decayS f32) (param $negEtaS f32) (param $wdS f32) (param $muS f32) (param $flags i32)
    (local $decay v128) (local $mult v128) (local $wd v128) (local $mu v128) (local $sign v128)
    (local $end i32) (local $rest i32)
    (local.set $decay (f32x4.splat (local.get $decayS)))
    (local.set $wd (f32x4.splat (local.get $wdS)))
    (local.set $mu (f32x4.splat (local.get $muS)))
    (local.set $sign (i32x4.splat (select (i32.const 0x80000000) (i32.const 0) (i32.and (local.get $flags) (i32.const 4)))))
    ;; without weight decay maximize folds into eta's sign: (-g) * (-eta) = g * eta, exactly
    (local.set $mult (f32x4.splat (local.get $negEtaS)))
    (if (i32.eqz (i32.and (local.get $flags) (i32.const 1)))
      (then (local.set $mult (v128.xor (local.get $mult) (local.get $sign)))))
    (local.set $end (i32.shl (i32.and (local.get $n) (i32.const -8)) (i32.const 2)))
    (call $run (local.get $end) (local.get $pp) (local.get $gp) (local.get $ap)
      (local.get $decay) (local.get $mult) (local.get $wd) (local.get $mu) (local.get $sign) (local.get $flags))

    ;; the last n % 8 elements: through the scratch at address 0 (lanes past n are zeros)
    (local.set $rest (i32.sub (i32.shl (local.get $n) (i32.const 2)) (local.get $end)))
    (if (local.get $rest)
      (then
        (memory.fill (i32.const 0) (i32.const 0) (i32.const 96))
        (memory.copy (global.get $TAIL_P) (i32.add (local.get $pp) (local.get $end)) (local.get $rest))
        (memory.copy (global.get $TAIL_G) (i32.add (local.get $gp) (local.get $end)) (local.get $rest))
        (memory.copy (global.get $TAIL_A) (i32.add (local.get $ap) (local.get $end)) (local.get $rest))
        (call $run (i32.const 32) (global.get $TAIL_P) (global.get $TAIL_G) (global.get $TAIL_A)
          (local.get $decay) (local.get $mult) (local.get $wd) (local.get $mu) (local.get $sign) (local.get $flags))
        (memory.copy (i32.add (local.get $pp) (local.get $end)) (global.get $TAIL_P) (local.get $rest))
        (memory.copy (i32.add (local.get $ap) (local.get $end)) (global.get $TAIL_A) (local.get $rest)))))
)
