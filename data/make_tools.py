"""Writes the tool-calling example set: data/tools_train.jsonl and data/tools_test.jsonl (every fifth conversation).

    python data/make_tools.py        # deterministic: the same files every time

Automotive diagnosis with six tools. Each conversation declares three or four of them in its system message and shows
one of: a single call; parallel calls (several calls in one assistant turn: consecutive call messages, then their
observations in the same order); several steps of call -> observation -> call; a call without arguments; a turn that
needs no tool; a multi-turn conversation mixing both. The format is the one README "Tool calling" describes: a call
is {"role": "assistant", "metadata": <tool>, "content": <JSON arguments>}, a result {"role": "observation", ...}.
"""
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent


def tool(name, description, properties=None, required=()):
    parameters = {"type": "object", "properties": properties or {}}
    if required:
        parameters["required"] = list(required)
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def string(description):
    return {"type": "string", "description": description}


TOOLS = {
    "read_fault_codes": tool("read_fault_codes", "读取车辆某个系统的故障码",
                             {"system": string("要读取的系统，如 发动机、变速箱、ABS、空调")}, ["system"]),
    "lookup_fault_code": tool("lookup_fault_code", "查询故障码的含义和常见原因",
                              {"code": string("故障码，如 P0301")}, ["code"]),
    "read_live_data": tool("read_live_data", "读取传感器的实时数据流",
                           {"sensor": string("传感器名称，如 冷却液温度、进气压力、氧传感器电压")}, ["sensor"]),
    "get_vehicle_info": tool("get_vehicle_info", "读取当前连接车辆的车型、年份和里程，不需要参数"),
    "estimate_repair_cost": tool("estimate_repair_cost", "估算更换某个零件的费用（元）",
                                 {"part": string("零件名称"),
                                  "labor_hours": {"type": "number", "description": "预计工时"}}, ["part"]),
    "find_service_center": tool("find_service_center", "查找城市里的维修服务站",
                                {"city": string("城市名"), "brand": string("品牌，可选")}, ["city"]),
}
SYSTEM = "你是汽车故障诊断助手，需要时调用工具，回答要简洁准确。"

CODES = {
    "P0128": ("冷却液温度低于节温器调节温度", ["节温器常开", "冷却液温度传感器故障"], "节温器", 180, 1.0),
    "P0301": ("1 缸失火", ["点火线圈损坏", "火花塞老化", "喷油嘴堵塞"], "点火线圈", 260, 0.5),
    "P0171": ("系统过稀（第 1 列）", ["进气管漏气", "空气流量计脏污", "燃油压力低"], "空气流量计", 650, 0.5),
    "P0420": ("三元催化器效率低于阈值", ["三元催化器老化", "后氧传感器故障"], "三元催化器", 2800, 2.0),
    "P0700": ("变速箱控制系统故障", ["变速箱电磁阀故障", "变速箱油不足"], "变速箱电磁阀", 900, 3.0),
    "C0035": ("左前轮速传感器电路故障", ["轮速传感器损坏", "线束断路"], "轮速传感器", 320, 1.0),
    "B1422": ("空调压力传感器电路故障", ["压力传感器损坏", "插头腐蚀"], "空调压力传感器", 240, 0.8),
    "P0340": ("凸轮轴位置传感器电路故障", ["凸轮轴位置传感器损坏", "正时偏差"], "凸轮轴位置传感器", 210, 0.6),
}
SYSTEM_CODES = {"发动机": ["P0128", "P0301", "P0171", "P0420", "P0340"], "变速箱": ["P0700"], "ABS": ["C0035"],
                "空调": ["B1422"]}
SENSORS = {"冷却液温度": ("°C", 72, 108), "进气压力": ("kPa", 28, 101), "氧传感器电压": ("V", 0.1, 0.9),
           "发动机转速": ("rpm", 700, 3000), "蓄电池电压": ("V", 11.6, 14.4)}
CITIES = ["北京", "上海", "广州", "成都", "武汉", "西安"]
BRANDS = ["大众", "丰田", "本田", "别克", "吉利"]
CARS = [("大众 朗逸", 2018), ("丰田 卡罗拉", 2016), ("本田 思域", 2020), ("别克 英朗", 2017), ("吉利 帝豪", 2019)]
NO_TOOL_QA = [
    ("发动机水温高一般先检查什么？", "先停车降温，再检查冷却液液位、散热风扇和节温器；不要在高温时打开水箱盖。"),
    ("刹车时方向盘抖动是什么原因？", "多半是刹车盘变形或磨损不均，建议检查刹车盘跳动量，必要时光盘或更换。"),
    ("机油多久换一次？", "矿物油约 5000 公里，全合成机油约 10000 公里，以保养手册为准。"),
    ("冷车启动困难可能是什么问题？", "常见原因有蓄电池电量不足、火花塞老化和燃油压力不足，可以先测蓄电池电压。"),
    ("轮胎气压多少合适？", "以车门框或油箱盖上的标签为准，一般家用轿车在 2.2 到 2.5 bar 之间。"),
    ("故障码是什么意思？", "故障码是车辆电控单元记录的故障编号，例如 P 开头是动力系统，C 开头是底盘，B 开头是车身。"),
    ("空调出风有异味怎么办？", "先更换空调滤芯，再用蒸发箱清洗剂清洗，平时熄火前几分钟关闭压缩机吹干蒸发箱。"),
    ("怠速抖动要不要马上修？", "轻微抖动可以先检查火花塞和节气门积碳；如果故障灯闪烁，说明有失火，应尽快检修。"),
]


def dumps(value):
    return json.dumps(value, ensure_ascii=False)


def call(name, **arguments):
    return {"role": "assistant", "metadata": name, "content": dumps(arguments)}


def observation(value):
    return {"role": "observation", "content": dumps(value)}


def user(text):
    return {"role": "user", "content": text}


def answer(text):
    return {"role": "assistant", "content": text}


def system_with(rng, needed):
    """A system message declaring the tools the conversation calls and one or two others: three or four in all
    (every tool costs its JSON schema in the prompt)."""
    others = [name for name in TOOLS if name not in needed]
    count = max(3, len(needed)) + rng.randint(0, 1)
    chosen = set(needed) | set(rng.sample(others, count - len(set(needed))))
    return {"role": "system", "content": SYSTEM, "tools": [TOOLS[name] for name in TOOLS if name in chosen]}


def lookup(code):
    meaning, causes, _, _, _ = CODES[code]
    return {"code": code, "meaning": meaning, "common_causes": causes}


def single_call(rng):
    system = rng.choice(list(SYSTEM_CODES))
    codes = rng.sample(SYSTEM_CODES[system], rng.randint(0, min(2, len(SYSTEM_CODES[system]))))
    text = rng.choice(["{}故障灯亮了，帮我读一下故障码。", "帮我查一下{}有没有故障码。", "{}好像有问题，读个码看看。"])
    if codes:
        found = "；".join(f"{c}（{CODES[c][0]}）" for c in codes)
        reply = f"{system}读到 {len(codes)} 个故障码：{found}。建议先从{CODES[codes[0]][1][0]}查起。"
    else:
        reply = f"{system}没有故障码，如果仍有异常，建议读取数据流进一步检查。"
    return [system_with(rng, ["read_fault_codes"]), user(text.format(system)), call("read_fault_codes", system=system),
            observation({"system": system, "codes": codes}), answer(reply)]


def sensor_reading(rng, sensor):
    unit, low, high = SENSORS[sensor]
    value = round(rng.uniform(low, high), 2 if high < 20 else 0)
    return {"sensor": sensor, "value": value if high < 20 else int(value), "unit": unit}


def single_live_data(rng):
    sensor = rng.choice(list(SENSORS))
    reading = sensor_reading(rng, sensor)
    return [system_with(rng, ["read_live_data"]), user(f"看一下{sensor}现在是多少。"), call("read_live_data", sensor=sensor),
            observation(reading), answer(f"当前{sensor}为 {reading['value']} {reading['unit']}。")]


def parallel_fault_codes(rng):
    systems = rng.sample(list(SYSTEM_CODES), 2)
    results = {s: rng.sample(SYSTEM_CODES[s], rng.randint(0, 1)) for s in systems}
    parts = [f"{s}{'：' + '、'.join(results[s]) if results[s] else '无故障码'}" for s in systems]
    return [system_with(rng, ["read_fault_codes"]), user(f"同时读一下{systems[0]}和{systems[1]}的故障码。"),
            call("read_fault_codes", system=systems[0]), call("read_fault_codes", system=systems[1]),
            observation({"system": systems[0], "codes": results[systems[0]]}),
            observation({"system": systems[1], "codes": results[systems[1]]}),
            answer("读取结果：" + "；".join(parts) + "。")]


def parallel_live_data(rng):
    sensors = rng.sample(list(SENSORS), rng.choice([2, 3]))
    readings = [sensor_reading(rng, s) for s in sensors]
    listed = "、".join(sensors)
    summary = "，".join(f"{r['sensor']} {r['value']} {r['unit']}" for r in readings)
    return ([system_with(rng, ["read_live_data"]), user(f"帮我一起看看{listed}的数据。")]
            + [call("read_live_data", sensor=s) for s in sensors] + [observation(r) for r in readings]
            + [answer(f"当前数据：{summary}。")])


def parallel_lookup_and_info(rng):
    code = rng.choice(list(CODES))
    car, year = rng.choice(CARS)
    mileage = rng.randrange(20000, 180000, 1000)
    info = lookup(code)
    return [system_with(rng, ["lookup_fault_code", "get_vehicle_info"]),
            user(f"{code} 是什么意思？顺便看看这台车的信息。"),
            call("lookup_fault_code", code=code), call("get_vehicle_info"),
            observation(info), observation({"model": car, "year": year, "mileage_km": mileage}),
            answer(f"这是一台 {year} 年的{car}，里程 {mileage} 公里。{code} 表示{info['meaning']}，"
                   f"常见原因：{'、'.join(info['common_causes'])}。")]


def multi_step(rng):
    system = rng.choice(["发动机", "发动机", "变速箱", "ABS", "空调"])
    code = rng.choice(SYSTEM_CODES[system])
    meaning, causes, part, price, hours = CODES[code]
    labor = int(hours * 200)
    return [system_with(rng, ["read_fault_codes", "lookup_fault_code", "estimate_repair_cost"]),
            user(f"{system}有点不对劲，帮我诊断一下，顺便估个修理费。"),
            call("read_fault_codes", system=system), observation({"system": system, "codes": [code]}),
            call("lookup_fault_code", code=code), observation(lookup(code)),
            call("estimate_repair_cost", part=part, labor_hours=hours),
            observation({"part": part, "parts_cost": price, "labor_cost": labor, "total": price + labor}),
            answer(f"{system}有故障码 {code}（{meaning}），最可能是{causes[0]}。更换{part}约需 {price + labor} 元"
                   f"（零件 {price} 元，工时费 {labor} 元）。")]


def service_center(rng):
    city = rng.choice(CITIES)
    brand = rng.choice(BRANDS)
    centers = [f"{brand}{city}{district}服务站" for district in rng.sample(["东区", "西区", "南区", "北区", "高新区"], 2)]
    return [system_with(rng, ["find_service_center"]), user(f"{city}哪里有{brand}的维修站？"),
            call("find_service_center", city=city, brand=brand), observation({"city": city, "centers": centers}),
            answer(f"{city}的{brand}维修站有：{'、'.join(centers)}。")]


def vehicle_info(rng):
    car, year = rng.choice(CARS)
    mileage = rng.randrange(20000, 180000, 1000)
    due = "已经超过" if mileage % 10000 > 5000 else "接近"
    return [system_with(rng, ["get_vehicle_info"]), user("这台车开了多少公里了？"), call("get_vehicle_info"),
            observation({"model": car, "year": year, "mileage_km": mileage}),
            answer(f"这台 {year} 年的{car}已经行驶 {mileage} 公里，{due}下一次保养里程。")]


def no_tool(rng):
    question, reply = rng.choice(NO_TOOL_QA)
    return [system_with(rng, []), user(question), answer(reply)]


def multi_turn(rng):
    question, reply = rng.choice(NO_TOOL_QA)
    follow = single_call(rng)
    system = json.loads(follow[2]["content"])["system"]
    return [follow[0], user(question), answer(reply), user(f"那帮我读一下{system}的故障码吧。"), *follow[2:]]


KINDS = [single_call, single_call, single_live_data, parallel_fault_codes, parallel_live_data,
         parallel_lookup_and_info, multi_step, multi_step, service_center, vehicle_info, no_tool, no_tool, multi_turn]
COUNT = 52


def main():
    rng = random.Random(20)
    conversations = [{"conversations": KINDS[i % len(KINDS)](rng)} for i in range(COUNT)]
    splits = {"tools_train.jsonl": [c for i, c in enumerate(conversations) if i % 5 != 4],
              "tools_test.jsonl": [c for i, c in enumerate(conversations) if i % 5 == 4]}
    for name, samples in splits.items():
        with open(HERE / name, "w", encoding="utf-8") as f:
            f.writelines(dumps(sample) + "\n" for sample in samples)
        print(f"{HERE / name}: {len(samples)} conversations")


if __name__ == "__main__":
    main()
