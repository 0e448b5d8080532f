"""Launch posenet_node (PoseNet camera relocalisation) with config/posenet.yaml, optionally RViz.

    ros2 launch ros2_posenet relocalize.launch.py checkpoint:=/path/model.pt image_topic:=/camera/image_raw

Precedence: ``params_file`` (default: the installed config/posenet.yaml), then the launch
arguments you set; an argument left empty does not override the params file. Every check
(params file, rviz2 installed, argument types) runs in ``ros2_posenet.ros.launch_plan`` before
any process starts, so a failed launch leaves nothing running. ``ros2 launch ... --show-args``
lists the arguments.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, RegisterEventHandler
from launch.event_handlers import OnProcessExit
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from ros2_posenet.ros.launch_plan import ARGUMENTS, NODE_NAME, configuration_exit_problem, plan_launch, require_node_files


def generate_launch_description() -> LaunchDescription:
    arguments = [
        DeclareLaunchArgument(
            argument.name, default_value=argument.default, description=argument.description,
            choices=list(argument.choices) if argument.choices else None,
        )
        for argument in ARGUMENTS
    ]
    return LaunchDescription([*arguments, OpaqueFunction(function=start_nodes)])


def stop_on_configuration_error(event, context):
    """The node exited because its parameters or checkpoint are unusable: fail the launch (non-zero), never respawn it."""
    problem = configuration_exit_problem(event.returncode, NODE_NAME)
    if problem:
        raise RuntimeError(problem)


def start_nodes(context):
    """Plan first (raises before anything starts), then the actions."""
    plan = plan_launch({argument.name: LaunchConfiguration(argument.name).perform(context) for argument in ARGUMENTS})
    require_node_files(plan)  # a missing checkpoint fails the launch here, not as a node exiting (and respawning) with code 2
    posenet = Node(
        package="ros2_posenet",
        executable=plan.executable,
        name=NODE_NAME,
        namespace=plan.namespace,
        output="screen",
        emulate_tty=True,
        parameters=plan.parameters,
        respawn=plan.respawn,
        respawn_delay=plan.respawn_delay,
    )
    actions = [posenet, RegisterEventHandler(OnProcessExit(target_action=posenet, on_exit=stop_on_configuration_error))]
    if plan.rviz_config is not None:
        actions.append(
            Node(
                package="rviz2",
                executable="rviz2",
                name="rviz2",
                namespace=plan.namespace,
                arguments=["-d", plan.rviz_config],
                parameters=[{"use_sim_time": bool(plan.use_sim_time)}],
            )
        )
    return actions
